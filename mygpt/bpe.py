"""GPT-2's byte-level byte-pair encoding, written from the algorithm and fast in pure Python.

Text is split into pre-tokens by GPT-2's regular expression; each pre-token's UTF-8 bytes start as one token per byte
and are merged pairwise, lowest merge rank first, until no ranked pair is left. Because the result depends only on the
pre-token, it is cached per pre-token, and a warm encode is one regex pass plus one dict lookup per pre-token.
Long pre-tokens (base64, DNA, minified code: runs without spaces) merge through a heap in O(n log n).
"""

import json
import multiprocessing
import operator
import os
from collections.abc import Mapping
from functools import lru_cache
from heapq import heapify, heappop, heappush
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import regex
import torch

from mygpt.download import sha256_file

# GPT-2's pre-tokeniser: common English contractions, then runs of letters, of digits or of other symbols (each may
# take one leading space), then whitespace; `\s+(?!\S)` leaves the last space of a run to start the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
DATA_DIR = Path(__file__).resolve().parent / "data"
# The vocabulary files shipped in mygpt/data/gpt2, byte-identical to OpenAI's release (see the README there).
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_NO_MERGE = (float("inf"), -1, -1, -1)
# Pre-tokens of at least this many bytes merge through the heap; shorter ones by whole passes, which do fewer steps on a
# few bytes (the crossover measured in bench/bench_bpe.py, --threshold).
HEAP_FROM_BYTES = 10
# Longer pre-tokens are not cached: they rarely repeat, and the cache's memory is bounded by its count of entries.
CACHE_MAX_CHARS = 256


@lru_cache(maxsize=None)
def bytes_to_unicode():
    """GPT-2's map from each byte value to a printable character, in GPT-2's id order (ids 0..255).

    Vocabulary files are text, so every byte needs a visible stand-in: printable Latin-1 bytes stand for themselves and
    the others (controls, space, soft hyphen...) take the characters from U+0100 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update((b, chr(256 + i)) for i, b in enumerate(others))
    return table


@lru_cache(maxsize=None)
def _unicode_to_byte():
    return {c: b for b, c in bytes_to_unicode().items()}


def _unicode_to_bytes(token):
    """The bytes that a vocabulary string stands for (the inverse of `bytes_to_unicode`)."""
    inverse = _unicode_to_byte()
    try:
        return bytes(inverse[c] for c in token)
    except KeyError as e:
        raise ValueError(f"vocabulary token {token!r} has character {e.args[0]!r} outside the byte alphabet") from None


def merge_pair(ids, left, right, merged):
    """`ids` with each occurrence of `left` followed by `right`, taken left to right, replaced by `merged`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == left and ids[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class _PieceCache(dict):
    """Pre-token -> ids; a miss runs the BPE. Cleared when full, so memory stays bounded on endless unique text."""

    def __init__(self, encode_piece, limit):
        super().__init__()
        self.encode_piece = encode_piece
        self.limit = limit

    def __missing__(self, piece):
        if len(self) >= self.limit:
            self.clear()
        ids = self[piece] = self.encode_piece(piece)
        return ids


class Encoder:
    """A byte-level BPE vocabulary: `encode` text to ids and `decode` ids to text.

    `encoder` maps each token, written in the `bytes_to_unicode` alphabet, to its id; `merges` lists the pairs of
    tokens in rank order. Tokens of `encoder` that are neither a byte nor made by a merge are special tokens, such as
    GPT-2's `<|endoftext|>`.
    """

    def __init__(self, encoder, merges, pattern=GPT2_PATTERN, cache_size=1 << 18):
        self.encoder = dict(encoder)
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self._split = regex.compile(pattern).findall
        by_value = sorted(bytes_to_unicode().items())
        self._byte_ids = [self._id_of(c, "byte") for _, c in by_value]
        self._merge_table = self._build_merge_table()
        made = set(bytes_to_unicode().values()) | {a + b for a, b in self.merges}
        self.special_tokens = {t: i for t, i in self.encoder.items() if t not in made}
        self._token_bytes = {i: _unicode_to_bytes(t) for t, i in self.encoder.items() if t in made}
        self._bytes_to_id = {b: i for i, b in self._token_bytes.items()}
        self._token_bytes.update((i, t.encode("utf-8")) for t, i in self.special_tokens.items())
        self.vocab_size = max(self._token_bytes) + 1
        self._decode_table = self._build_decode_table()
        self._cache = _PieceCache(self._encode_piece, cache_size)

    def _id_of(self, token, what):
        try:
            return self.encoder[token]
        except KeyError:
            raise ValueError(f"the vocabulary has no id for {what} token {token!r}") from None

    def _build_merge_table(self):
        """(left id, right id) -> (rank, merged id, left id, right id).

        The BPE works on ints, whose pairs hash faster than strings; the value repeats the pair so that the minimum
        over a pre-token's pairs says both what to merge and into what.
        """
        table = {}
        for rank, (a, b) in enumerate(self.merges):
            what = f"merge {rank} ({a!r} {b!r})"
            left, right = self._id_of(a, what), self._id_of(b, what)
            table[left, right] = (rank, self._id_of(a + b, what), left, right)
        return table

    def _build_decode_table(self):
        """id -> the token's bytes, each byte as one Latin-1 character, in a list.

        A list indexes faster than a dict, and joining a million short str is several times faster than joining as
        many bytes objects (bytes.join allocates a buffer descriptor per item). Ids missing from the vocabulary hold
        None, and so does a second half as long as the first: an id in -V..-1 would otherwise silently index from
        the end, and now lands on None, which `decode` reports as a bad id.
        """
        table = [None] * (2 * self.vocab_size)
        for i, data in self._token_bytes.items():
            table[i] = data.decode("latin-1")
        return table

    def __getstate__(self):
        # Rebuilt from the vocabulary on unpickling: the derived tables and the cache are larger than the files.
        return {"encoder": self.encoder, "merges": self.merges, "pattern": self.pattern,
                "cache_size": self._cache.limit}

    def __setstate__(self, state):
        self.__init__(**state)

    def _encode_piece(self, piece):
        """The ids of one pre-token: a single vocabulary token if it is one, else the BPE merges."""
        data = piece.encode("utf-8")
        whole = self._bytes_to_id.get(data)
        if whole is not None:
            return (whole,)
        return tuple(self._merge(list(map(self._byte_ids.__getitem__, data))))

    def _merge(self, ids, on_step=None):
        """Apply the lowest-ranked merge present, everywhere it occurs, until no pair of `ids` has a merge."""
        table = self._merge_table
        while len(ids) > 1:
            rank, merged, left, right = min(map(table.get, zip(ids, ids[1:]), repeat(_NO_MERGE)))
            if merged < 0:
                break
            ids = merge_pair(ids, left, right, merged)
            if on_step:
                on_step(ids)
        return ids

    def encode_ordinary(self, text):
        """Ids of `text`, with any special-token text encoded as ordinary text."""
        _require_str(text)
        return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))

    def encode(self, text, allowed_special=()):
        """Ids of `text`. Special tokens named in `allowed_special` (or all, with "all") map to their own ids; any
        other special-token text is ordinary text, as in GPT-2."""
        _require_str(text)
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        # A capturing split alternates ordinary text (even indices) and special tokens (odd indices).
        parts = regex.split("(" + "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True))) + ")", text)
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def _allowed(self, allowed_special):
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            raise TypeError(f'allowed_special must be "all" or a set of special tokens, '
                            f'not the string {allowed_special!r}')
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this vocabulary: {sorted(unknown)}; "
                             f"it has {sorted(self.special_tokens)}")
        return set(allowed_special)

    def decode_bytes(self, ids):
        """The bytes that `ids` stand for."""
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        try:
            return "".join(map(self._decode_table.__getitem__, ids)).encode("latin-1")
        except (IndexError, TypeError):
            bad = next(i for i in ids if not self._is_token_id(i))
            raise ValueError(f"token id {bad!r} is not in the vocabulary (ids 0..{self.vocab_size - 1})") from None

    def _is_token_id(self, i):
        try:
            i = operator.index(i)
        except TypeError:
            return False
        return 0 <= i < self.vocab_size and self._decode_table[i] is not None

    def decode(self, ids):
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_and_show_work(self, text):
        """Every step of encoding `text`, for learning how BPE works.

        Returns one dict per pre-token: the pre-token, its bytes written in the vocabulary's alphabet, the list of
        token strings after each merge (starting from single bytes), and its ids.
        """
        alphabet = bytes_to_unicode()
        names = {i: t for t, i in self.encoder.items()}
        steps = []
        for piece in self._split(text):
            data = piece.encode("utf-8")
            ids = list(map(self._byte_ids.__getitem__, data))
            parts = [[names[i] for i in ids]]
            ids = self._merge(ids, on_step=lambda now: parts.append([names[i] for i in now]))
            steps.append({"pretoken": piece, "bytes": "".join(alphabet[b] for b in data), "parts": parts, "ids": ids})
        return steps

    def encode_batch(self, texts, num_workers=1, allowed_special=()):
        """`encode` of each text; with `num_workers` > 1, in that many processes.

        The texts are cut into one contiguous group of about equal length per worker, so each worker costs a single
        round trip and its cache sees text that shares words. Workers are forked where the platform can, so they start
        with this encoder and its cache at no cost.
        """
        texts = list(texts)
        workers = min(num_workers, len(texts))
        if workers <= 1:
            return [self.encode(t, allowed_special) for t in texts]
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(workers, initializer=_set_worker_encoder, initargs=(self,)) as pool:
            groups = pool.starmap(_worker_encode, zip(_contiguous_groups(texts, workers), repeat(allowed_special)))
        return [ids for group in groups for ids in group]

    def save(self, directory):
        """Write `encoder.json` and `vocab.bpe` in GPT-2's formats into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ordered = dict(sorted(self.encoder.items(), key=lambda item: item[1]))
        with open(directory / "encoder.json", "w", encoding="utf-8") as f:
            json.dump(ordered, f)
        with open(directory / "vocab.bpe", "w", encoding="utf-8", newline="\n") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        return directory

    @classmethod
    def load(cls, directory, **kwargs):
        """The encoder saved in `directory` as `encoder.json` and `vocab.bpe` (GPT-2's formats)."""
        directory = Path(directory)
        with open(directory / "encoder.json", encoding="utf-8") as f:
            encoder = json.load(f)
        with open(directory / "vocab.bpe", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is the "#version" header and the file ends with a newline, hence the empty last item.
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad:
            raise ValueError(f"{directory / 'vocab.bpe'}: a merge line must be two tokens, got {' '.join(bad)!r}")
        return cls(encoder, merges, **kwargs)


def _require_str(text):
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}; decode bytes to text first")


_worker_encoder = None


def _set_worker_encoder(encoder):
    global _worker_encoder
    _worker_encoder = encoder


def _worker_encode(texts, allowed_special):
    return [_worker_encoder.encode(t, allowed_special) for t in texts]


def _contiguous_groups(texts, n):
    """`texts` cut, in order, into at most `n` groups of about equal total length."""
    total = sum(map(len, texts)) or 1
    groups, done = [[] for _ in range(n)], 0
    for text in texts:
        groups[min(n - 1, done * n // total)].append(text)
        done += len(text)
    return [g for g in groups if g]


def get_encoder(name="gpt2"):
    """The encoder of a vocabulary shipped with mygpt (only "gpt2"), loaded from the package with no network access.

    The result is loaded once and shared by all callers.
    """
    if name != "gpt2":
        raise ValueError(f"unknown vocabulary {name!r}: mygpt ships only 'gpt2'; "
                         "use Encoder.load(directory) for others")
    return _shipped_gpt2()


@lru_cache(maxsize=None)
def _shipped_gpt2():
    return load_verified(DATA_DIR / "gpt2", GPT2_SHA256)


def load_verified(directory, sha256):
    """`Encoder.load(directory)` after checking each file named in `sha256` against its hash, so that a damaged
    install fails loudly instead of giving wrong ids."""
    directory = Path(directory)
    for filename, expected in sha256.items():
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the mygpt install is incomplete, reinstall the package")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(f"{path} has sha256 {actual}, expected {expected}: the file is damaged, reinstall mygpt")
    return Encoder.load(directory)


class BPETokenizer:
    """GPT-2 BPE for models: text -> LongTensor of ids, ids tensor -> text.

    A string gives shape (1, T) and a list of n strings (n, T); strings of different lengths in one call need `pad_id`,
    which fills the shorter rows on the right. Unlike GPT-2's encoder, `<|endoftext|>` in the text becomes its own id
    (50256) by default, since text fed to a model marks document ends that way; pass `allowed_special=()` to keep it
    as ordinary text.
    """

    def __init__(self, encoder=None, allowed_special=(ENDOFTEXT,)):
        self.encoder = encoder or get_encoder()
        self.allowed_special = allowed_special

    def __call__(self, text, pad_id=None):
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encoder.encode(t, self.allowed_special) for t in texts]
        width = max(map(len, rows), default=0)
        if pad_id is None and any(len(r) != width for r in rows):
            raise ValueError(f"the texts encode to different lengths {sorted({len(r) for r in rows})}; pass pad_id")
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)

    def decode(self, ids):
        """A 1-D tensor (or list) of ids -> str; a 2-D tensor -> list of str, one per row."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 2:
                raise ValueError(f"decode takes a 1-D or 2-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.encoder.decode(row) for row in ids]
        return self.encoder.decode(ids)
