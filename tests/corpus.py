"""A deterministic, varied text corpus for the tokenizer tests and benchmark.

Real English prose (Python's own help topics) and real Python code (standard library sources) give realistic token
statistics; generated sections add the scripts, emoji, numbers and whitespace that the pre-tokeniser must split right.
Everything comes from the running Python and a seeded generator, so no download is needed.
"""

import importlib.util
import random
import unicodedata

import pydoc_data.topics

# About 2 MB of code; read from their files, not imported, so reading has no side effects.
STDLIB_MODULES = [
    "argparse", "collections", "dataclasses", "inspect", "json.decoder", "typing", "textwrap", "pathlib",
    "email.message", "http.client", "subprocess", "tarfile", "unittest.case", "logging", "asyncio.base_events",
    "_pydecimal", "pydoc", "difflib", "zipfile", "statistics", "enum", "functools", "shutil", "configparser",
    "doctest", "pickle", "ast",
]

CONTRACTIONS = ["I'm", "you're", "we've", "they'll", "she'd", "it's", "don't", "can't", "ISN'T", "o'clock", "'tis"]
WORDS = {
    "latin": ["café", "naïve", "façade", "über", "Ångström", "mañana", "São", "Paulo", "Łódź", "crème", "brûlée"],
    "greek": ["Καλημέρα", "κόσμε", "λόγος", "Ἀθῆναι", "φιλοσοφία", "ΑΒΓΔ", "μῆνιν", "ἄειδε", "θεά"],
    "cyrillic": ["Привет", "мир", "Съешь", "же", "ещё", "этих", "мягких", "булок", "Ёлка", "ДА"],
    "cjk": ["日本語", "中文", "漢字", "東京", "北京", "こんにちは", "カタカナ", "한국어", "안녕하세요", "。", "、"],
    "emoji": ["🙂", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏻‍💻", "🧑‍🚀", "❤️", "🇫🇷", "🐍", "✨"],
}
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "\u00a0", "\u3000", "    \n\t  "]


def english_prose(n_chars):
    """Real English: the text of Python's interactive help topics, in a fixed order."""
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text[:n_chars]


def python_code(n_chars):
    """Real Python source from a fixed list of standard library modules."""
    parts, size = [], 0
    for name in STDLIB_MODULES:
        if size >= n_chars:
            break
        with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
            parts.append(f.read())
        size += len(parts[-1])
    return "\n".join(parts)[:n_chars]


def _number(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if kind == 1:
        return f"{rng.uniform(-1e4, 1e4):.{rng.randrange(6)}f}"
    if kind == 2:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    return f"{rng.random():.3e}"


def _assigned_char(rng):
    """A random code point that this Python's Unicode tables know.

    Code points newer than `unicodedata.unidata_version` may be classified as letters or numbers by one regex engine
    and not by another (tiktoken's, the `regex` module's and Python's tables differ in Unicode version), so they are
    left out: a mismatch there says nothing about the BPE.
    """
    while True:
        c = chr(rng.randrange(0x20, 0x30000))
        if unicodedata.category(c) not in ("Cn", "Cs"):
            return c


def multilingual(n_chars, seed=0):
    """Generated text mixing scripts, emoji with joiners, contractions, numbers, whitespace runs and rare characters."""
    rng = random.Random(seed)
    kinds = list(WORDS) + ["contraction", "number", "whitespace", "rare"]
    parts, size = [], 0
    while size < n_chars:
        kind = rng.choice(kinds)
        if kind == "contraction":
            piece = rng.choice(CONTRACTIONS)
        elif kind == "number":
            piece = _number(rng)
        elif kind == "whitespace":
            piece = rng.choice(WHITESPACE)
        elif kind == "rare":
            piece = "".join(_assigned_char(rng) for _ in range(rng.randrange(1, 6)))
        else:
            piece = rng.choice(WORDS[kind])
        piece += rng.choice(["", " ", " ", " ", ", ", ".", "\n"])
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


def mixed_text(n_chars, seed=0):
    """English prose, Python code and generated multilingual text in about equal thirds, `n_chars` long."""
    third = n_chars // 3
    text = english_prose(third) + "\n" + python_code(third) + "\n" + multilingual(third, seed)
    return text[:n_chars]


def english_and_code(n_chars):
    """Half English prose, half Python code: the kind of text the speed targets were measured on."""
    half = n_chars // 2
    return english_prose(half) + "\n" + python_code(half)
