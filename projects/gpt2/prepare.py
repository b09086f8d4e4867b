"""
Token shards of GPT-2's BPE for projects/gpt2/train.py.

    python projects/gpt2/prepare.py                                 # tiny shakespeare -> out/data/shakespeare
    python projects/gpt2/prepare.py book.txt --out=out/data/book    # one text: first 90% train, last 10% val
    python projects/gpt2/prepare.py notes/ chats.jsonl --out=out/data/mine   # many documents: split by document
    python projects/gpt2/prepare.py openwebtext                     # streamed from the hub: pip install 'mygpt[data]'
    python projects/gpt2/prepare.py fineweb10B
    python projects/gpt2/prepare.py path/to/fineweb10B/             # llm.c / modded-nanogpt shards: used as they are

Everything goes through mygpt.prepare_corpus, as `mygpt prepare` does: one text file is cut as nanoGPT cuts
tiny shakespeare, the first 90% of its characters train and the last 10% validate; anything else (several files,
a folder, .jsonl, .parquet, a dataset) is split by document, a document going to validation with probability
--val_fraction. Each document, and each part of one text, ends with <|endoftext|>. Already tokenised llm.c shards need no preparing.
"""

import argparse
import glob
import os
import sys
from pathlib import Path

from mygpt import DownloadError, prepare_corpus, read_header, run_main, tiny_shakespeare

# name -> (datasets.load_dataset arguments, share of documents that validate). Both are stored as data files
# on the hub; prepare_corpus streams them and never runs a dataset script.
DATASETS = {
    "openwebtext": ({"path": "Skylion007/openwebtext"}, 0.0005),   # nanoGPT's split: 0.05% of documents
    "fineweb10B": ({"path": "HuggingFaceFW/fineweb", "name": "sample-10BT"}, 0.01),  # ~100M val tokens, as llm.c
    "fineweb-edu10B": ({"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}, 0.01),
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help=f"text files, folders, .jsonl/.parquet files, glob patterns, a dataset name "
                        f"({', '.join(DATASETS)}) or folders of llm.c shards (default: tiny shakespeare)")
    p.add_argument("--out", help="folder for the shards and meta.json (default: out/data/NAME)")
    p.add_argument("--val_fraction", type=float,
                   help="one text: the share of characters at its end that validates (0.1); otherwise the share of "
                        "documents that validate (0.005, or the dataset's own: openwebtext 0.0005, fineweb 0.01)")
    p.add_argument("--num_workers", type=int, help="encoding processes (default: all cores)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (100M)")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl/.parquet/dataset rows (text)")
    return p.parse_args(argv)


def is_shards(source):
    """Whether a source names token shards (.bin files, or a folder holding them) rather than text."""
    if os.path.isdir(source):
        return bool(glob.glob(os.path.join(source, "*.bin")))
    return source.endswith(".bin")


def check_shards(sources):
    """Check the header and size of every shard; print what train.py will read from each folder."""
    for source in sources:
        folder = source if os.path.isdir(source) else os.path.dirname(source) or "."
        paths = sorted(glob.glob(os.path.join(source, "*.bin"))) if os.path.isdir(source) else sorted(glob.glob(source))
        if not paths:
            raise FileNotFoundError(f"no shard files match {source!r}")
        counts = {"train": 0, "val": 0}
        for path in paths:
            header = read_header(path)  # a ShardError names a file that is not one whole shard
            split = "val" if "val_" in os.path.basename(path) else "train"
            counts[split] += header.num_tokens
        print(f"{folder}: {len(paths)} shards, {counts['train']:,} train and {counts['val']:,} val tokens, "
              f"used as they are. Train with --data.dir={folder}")


def default_corpus():
    """Tiny shakespeare from the download cache; offline, the error says what else to prepare."""
    try:
        return tiny_shakespeare()
    except DownloadError as err:
        raise DownloadError(f"{err}; or prepare any UTF-8 text you have: python projects/gpt2/prepare.py "
                            f"book.txt") from None


def default_out(sources):
    if not sources:
        return "out/data/shakespeare"
    if len(sources) == 1:
        return os.path.join("out", "data", Path(sources[0].rstrip("/")).stem or "corpus")
    raise ValueError("several sources make one corpus: name its folder with --out=DIR")


def main(argv):
    args = parse_args(argv)
    sources = args.sources
    if sources and all(is_shards(s) for s in sources):
        check_shards(sources)
        return
    if any(is_shards(s) for s in sources):
        raise ValueError("give either token shards (.bin) or text sources, not both")
    out_dir = Path(args.out or default_out(sources))
    named = [DATASETS[s] for s in sources if s in DATASETS]
    corpus = [DATASETS[s][0] if s in DATASETS else s for s in sources] or [default_corpus()]
    val_fraction = args.val_fraction if args.val_fraction is not None else (named[0][1] if named else None)
    # one text is cut 90/10 by characters, anything else split by document: prepare_corpus's rule, as `mygpt prepare`'s
    meta = prepare_corpus(corpus, out_dir, tokenizer="gpt2", val_fraction=val_fraction,
                          shard_tokens=args.shard_tokens, num_workers=args.num_workers, text_field=args.text_field)
    for split in ("train", "val"):
        print(f"{split}: {meta[split]['tokens']:,} tokens in {meta[split]['shards']} shards")
    print(f"written to {out_dir}; train with: python projects/gpt2/train.py cpu --data.dir={out_dir}")


if __name__ == "__main__":
    sys.exit(run_main(main))  # the library's errors as one line, `NAME: error: ...`, as the mygpt command prints them
