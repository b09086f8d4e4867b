"""A deterministic, varied text corpus for the tokenizer tests and benchmark.

Real English prose (Python's own help topics) and real Python code (standard library sources) give realistic token
statistics; generated sections add the scripts, emoji, numbers and whitespace that the pre-tokeniser must split right.
Everything comes from the running Python and a seeded generator, so no download is needed.
"""

import base64
import importlib.util
import pydoc_data.topics
import random
import sys
import unicodedata

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


def _letters(n, rng):
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", k=n))


def _base64(n, rng):
    return base64.b64encode(rng.randbytes(n * 3 // 4 + 3)).decode("ascii")[:n]


def _dna(n, rng):
    return "".join(rng.choices("ACGT", k=n))


def _minified_js(n, rng):
    """Code with no whitespace at all, as minifiers write it: short names, numbers and runs of punctuation."""
    names = ["a", "b", "e", "t", "n", "r", "i", "o", "fn", "cb", "xs", "_0x3f", "$", "el", "Ut", "Qe"]
    pieces = ["function(", "){", "return ", ";", "}", "var ", "=", "==", "!==", "&&", "||", "?", ":", ",", ".",
              "[", "]", "(", ")", "=>", "+", "-", "*", "/", "!0", "!1", "void 0", "null", "'use strict'", "\"\\n\""]
    parts, size = [], 0
    while size < n:
        kind = rng.randrange(3)
        piece = rng.choice(names) if kind == 0 else str(rng.randrange(10 ** 4)) if kind == 1 else rng.choice(pieces)
        parts.append(piece.replace(" ", ""))
        size += len(parts[-1])
    return "".join(parts)[:n]


def _url(n, rng):
    """One URL: a host, deep path segments of letters and digits, then a query of long percent-encoded values."""
    parts = ["https://cdn.example.com/"]
    size = len(parts[0])
    while size < n:
        if rng.random() < 0.5:
            piece = _letters(rng.randrange(5, 40), rng) + str(rng.randrange(10 ** 6)) + "/"
        else:
            piece = "?q=" + "".join(f"%{b:02X}" for b in rng.randbytes(rng.randrange(5, 60))) + "&id="
        parts.append(piece)
        size += len(piece)
    return "".join(parts)[:n]


def _repeated(n, rng):
    return "a" * n


def _spaces(n, rng):
    return " " * n


def _digits(n, rng):
    return "".join(rng.choices("0123456789", k=n))


def _latin1_bytes(n, rng):
    """Random bytes read as Latin-1: controls, whitespace, letters with accents and symbols, each byte one char."""
    return rng.randbytes(n).decode("latin-1")


def _unicode(n, rng):
    """Random assigned code points: mostly CJK and other letters, so runs of multi-byte letters with no break."""
    return "".join(_assigned_char(rng) for _ in range(n))


# Text a corpus may hold that the pre-tokeniser cannot cut into words: each kind gives pre-tokens thousands of bytes
# long (or, for minified code and URLs, long runs of short ones with no spaces). kind -> f(n_chars, rng) -> str.
LONG_RUNS = {
    "random letters": _letters, "base64": _base64, "DNA": _dna, "minified JS": _minified_js, "long URL": _url,
    "one repeated char": _repeated, "spaces": _spaces, "digits": _digits, "random bytes as Latin-1": _latin1_bytes,
    "random Unicode": _unicode,
}


def long_run(kind, n_chars, seed=0):
    """`n_chars` of the `LONG_RUNS` kind `kind`, from a seeded generator."""
    return LONG_RUNS[kind](n_chars, random.Random(seed))


def lines_run(fn, *modules):
    """(fn()'s result, the number of lines of `modules` that ran meanwhile): a count of work that, unlike time, is
    the same on every run and every machine, for showing how a cost grows with the input."""
    files = {module.__file__ for module in modules}
    count = 0

    def on_line(frame, event, arg):
        nonlocal count
        count += event == "line"
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename in files else None

    sys.settrace(on_call)
    try:
        result = fn()
    finally:
        sys.settrace(None)
    return result, count
