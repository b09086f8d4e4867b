"""Token corpora on disk: shards in llm.c's format and `TokenDataset` to train from them (mygpt/prepare.py writes them).

Shard format (llm.c and modded-nanogpt's, so their pre-tokenised FineWeb shards train here unchanged):

    bytes 0..1023   header: 256 little-endian int32 = magic, version, N (tokens in the file), then 253 zeros
    bytes 1024..    N tokens, little-endian, uint16 or uint32 as the (magic, version) pair says:
                    (20240520, 1) uint16, vocabularies up to 65,536 ids (llm.c's "gpt-2");
                    (20240801, 7) uint32, larger vocabularies (llm.c's "llama-3")
    the file ends right after the last token; N < 2**31, since the header stores it as an int32.

nanoGPT's headerless `train.bin`/`val.bin` (bare uint16 tokens) are read only when asked: `headerless=True`.

A corpus that `prepare_corpus` wrote is `train_000000.bin, ...` and `val_000000.bin, ...`, one token stream per
split, with `meta.json` beside them (the tokenizer's record, the vocabulary size, the counts and the settings).
`TokenDataset` memory-maps the shards and serves the windows of that stream.
"""

import glob as globlib
import json
import mmap
import os
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mygpt.tokenizer import fingerprint, same_tokenizer
from mygpt.utils import temporary_name

_HEADER_INTS = 256
HEADER_BYTES = 4 * _HEADER_INTS
_FORMATS = {(20240520, 1): np.dtype("<u2"), (20240801, 7): np.dtype("<u4")}  # (magic, version) -> token dtype
MAX_SHARD_TOKENS = 2**31 - 1

ShardHeader = namedtuple("ShardHeader", "magic version num_tokens dtype")


class ShardError(ValueError):
    """A file is not a whole token shard: wrong magic or version, truncated, or with bytes after its tokens."""


# ---------------------------------------------------------------------------------------------------- the format

def _format_of(dtype):
    dtype = np.dtype(dtype).newbyteorder("<")
    for key, value in _FORMATS.items():
        if value == dtype:
            return key
    raise ValueError(f"shards hold uint16 or uint32 tokens, not {dtype.name}")


class _ShardFile:
    """One shard being written under a temporary name (unique per process); `commit` renames it when whole."""

    def __init__(self, path, dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.magic, self.version = _format_of(self.dtype)
        self.count = 0
        self.tmp = temporary_name(self.path)
        self.file = open(self.tmp, "wb")
        self.file.write(bytes(HEADER_BYTES))  # a zero header (magic 0) until the shard is whole

    def append(self, tokens):
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.count += len(tokens)

    def commit(self):
        header = np.zeros(_HEADER_INTS, dtype="<i4")
        header[:3] = self.magic, self.version, self.count
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())  # the bytes are on disk before the rename makes them the shard
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path, tokens, dtype=None):
    """Write `tokens` (ints >= 0) as one shard at `path`, atomically. dtype: uint16 (the default when every token
    fits) or uint32."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not (tokens.size == 0 or np.issubdtype(tokens.dtype, np.integer)):
        raise TypeError(f"tokens must be a 1-D sequence of ints, got {tokens.dtype} of shape {tokens.shape}")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS:,} tokens (an int32 count), got {len(tokens):,}")
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    dtype = np.dtype(dtype or (np.uint16 if high < 2**16 else np.uint32))
    if low < 0 or high > np.iinfo(dtype).max:
        raise ValueError(f"token ids must lie in 0..{np.iinfo(dtype).max} for {dtype.name} shards, "
                         f"got {low}..{high}")
    shard = _ShardFile(path, dtype)
    try:
        shard.append(tokens)
        shard.commit()
    except BaseException:
        shard.discard()
        raise


def read_header(path):
    """The `ShardHeader` of the shard at `path`, after checking that the file is exactly one whole shard."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError names the path
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is too short for a shard's {HEADER_BYTES}-byte header "
                         f"(a nanoGPT train.bin without header? pass headerless=True)")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4")[:3])
    if magic not in {m for m, _ in _FORMATS}:
        raise ShardError(f"{path} is not a token shard: magic {magic}, expected 20240520 (uint16) or 20240801 "
                         f"(uint32) (a nanoGPT train.bin without header? pass headerless=True)")
    dtype = _FORMATS.get((magic, version))
    if dtype is None:
        known = [v for m, v in _FORMATS if m == magic]
        raise ShardError(f"{path}: shard version {version} is unknown for magic {magic} (known: {known}); "
                         f"it was written by a newer or different tool")
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size < expected:
        raise ShardError(f"{path} is truncated: its header promises {count:,} tokens ({expected:,} bytes), "
                         f"the file has {size:,} bytes")
    if size > expected:
        raise ShardError(f"{path} has {size - expected:,} bytes after its {count:,} tokens; it is not one whole shard")
    return ShardHeader(magic, version, count, dtype)


# ---------------------------------------------------------------------------------------------------- reading

def _expand(pattern_or_paths):
    """Paths from one path or glob pattern, or a list of them; each pattern's matches sorted."""
    items = [pattern_or_paths] if isinstance(pattern_or_paths, (str, os.PathLike)) else list(pattern_or_paths)
    paths = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"shard paths must be str or Path, got {type(item).__name__}")
        item = os.fspath(item)
        if globlib.has_magic(item):
            matches = sorted(p for p in globlib.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no shard files match {item!r}")
            paths += map(Path, matches)
        elif os.path.isdir(item):
            raise IsADirectoryError(f"{item} is a folder; name its shards, e.g. {os.path.join(item, 'train_*.bin')!r}")
        else:
            paths.append(Path(item))
    if not paths:
        raise ValueError("no shard paths given")
    return paths


def _read_meta(paths):
    """The meta.json beside the shards, as a dict (None where there is none: llm.c's shards come without).

    A folder without meta.json but with prepare.json or a temporary shard holds a prepare_corpus run that was
    interrupted (or is running): its shards are a part of the corpus, so it is refused.
    """
    metas = {}
    for folder in sorted({p.parent for p in paths}):
        meta = folder / "meta.json"
        if meta.is_file():
            with open(meta, encoding="utf-8") as f:
                metas[meta] = json.load(f)
            continue
        unfinished = [*folder.glob("prepare.json"), *folder.glob("train_*.bin.tmp-*"), *folder.glob("val_*.bin.tmp-*")]
        if unfinished:
            raise ValueError(f"{folder} holds an unfinished corpus: prepare_corpus was interrupted there or is still "
                             f"running ({unfinished[0].name}, no meta.json); run the same prepare again to finish it")
    first = next(iter(metas.values()), None)
    if not all(_same_vocabulary(first, meta) for meta in metas.values()):
        raise ValueError(f"the shards come from corpora of different tokenizers: {', '.join(map(str, metas))}")
    return first


def _same_vocabulary(a, b):
    """Whether two meta.json dicts record one tokenizer (records of either form: mygpt.tokenizer.same_tokenizer)."""
    first, second = (meta.get("settings", {}).get("tokenizer") for meta in (a, b))
    return a.get("vocab_size") == b.get("vocab_size") and (
        first == second or None not in (first, second) and same_tokenizer(first, second, a.get("vocab_size")))


class TokenDataset(Dataset):
    """Windows of `block_size` tokens from shards on disk; item i is (x, y), int64 tensors of shape (block_size,), y
    being x shifted by one token.

    The shards are read as one stream, concatenated in order (the sorted matches of each glob pattern), and window i
    is tokens [i * block_size, i * block_size + block_size + 1) of it: consecutive windows share one token, the
    target of the last position. Windows may cross from one shard into the next, since shards are cuts of one stream
    (documents are separated by the end-of-text id, not by files); so the windows do not depend on the shard size, and
    a short last shard costs nothing. len() = (num_tokens - 1) // block_size.

    Memory does not grow with the corpus: each shard is memory-mapped on first use in each process (a pickled
    dataset, as DataLoader workers receive, carries file names and counts only), plus one int per shard.
    """

    def __init__(self, pattern_or_paths, block_size, headerless=False):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.headerless = headerless
        paths = _expand(pattern_or_paths)
        shards = [self._shard_info(p) for p in paths]
        # shards without tokens take no part in reading: a window never needs to open them
        self.paths = [p for p, (_, count, _) in zip(paths, shards) if count]
        self._offsets = [offset for offset, count, _ in shards if count]
        self._dtypes = [dtype for _, count, dtype in shards if count]
        counts = np.array([count for _, count, _ in shards if count], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # stream position of each shard's first token
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens < block_size + 1:
            names = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
            raise ValueError(f"block_size {block_size} needs at least {block_size + 1} tokens, but {names} "
                             f"hold {self.num_tokens:,}; use a smaller block_size or more text")
        meta = _read_meta(paths) or {}
        self.vocab_size = meta.get("vocab_size")
        # the tokenizer's record (mygpt.tokenizer), which load_tokenizer rebuilds; see check_tokenizer
        self.tokenizer = meta.get("settings", {}).get("tokenizer")
        self._maps = [None] * len(self.paths)

    def check_tokenizer(self, tokenizer, owner="the checkpoint"):
        """Raise ValueError unless `tokenizer` (a checkpoint's tokenizer record, "gpt2", an Encoder, a list of
        characters: what describe_tokenizer accepts) is the one meta.json records (mygpt.tokenizer.same_tokenizer:
        older meta.json files compare by the sha256 of the vocabulary); shards without meta.json record none, so
        they pass."""
        if self.tokenizer is None or tokenizer is None:
            return
        if not same_tokenizer(self.tokenizer, tokenizer, self.vocab_size):
            raise ValueError(f"the shards {self.paths[0].parent} were prepared with another tokenizer than "
                             f"{owner}'s ({fingerprint(self.tokenizer, self.vocab_size)} in meta.json, "
                             f"{fingerprint(tokenizer)}); use the tokenizer the corpus was "
                             f"prepared with, or prepare it again with this one")

    def _shard_info(self, path):
        """(byte offset of the tokens, token count, dtype) of one file."""
        if not self.headerless:
            header = read_header(path)
            return HEADER_BYTES, header.num_tokens, header.dtype
        size = path.stat().st_size
        if size % 2:
            raise ShardError(f"{path}: a headerless nanoGPT file holds uint16 tokens, but it has an odd size ({size})")
        return 0, size // 2, np.dtype("<u2")

    def __getstate__(self):
        return dict(self.__dict__, _maps=[None] * len(self.paths))  # each process maps the files itself

    def _map(self, s):
        """Shard s's tokens as a read-only array over a memory map of the file."""
        if self._maps[s] is None:
            with open(self.paths[s], "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mapped, "madvise"):
                # Windows are read in random order; read-ahead would fetch ~32 pages around each 1-2 page window.
                # On pages never read before, bench/bench_data.py saw 20 to 4,400 random batches/s without this
                # advice, as the kernel's read-ahead heuristics came and went, and 2,600 to 5,300 with it.
                mapped.madvise(mmap.MADV_RANDOM)
            count = int(self._starts[s + 1] - self._starts[s])
            self._maps[s] = np.frombuffer(mapped, dtype=self._dtypes[s], count=count, offset=self._offsets[s])
        return self._maps[s]

    def __len__(self):
        return (self.num_tokens - 1) // self.block_size

    def _read(self, start, out):
        """Fill `out` with the stream's tokens from position `start` on, across shards if need be."""
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, filled = start - int(self._starts[s]), 0
        while filled < len(out):
            shard = self._map(s)
            take = min(len(out) - filled, len(shard) - pos)
            out[filled:filled + take] = shard[pos:pos + take]
            filled, s, pos = filled + take, s + 1, 0

    def _check_index(self, i, n):
        if not -n <= i < n:
            raise IndexError(f"window {i} is outside a dataset of {n:,} windows")
        return i % n

    def __getitem__(self, i):
        i = self._check_index(int(i), len(self))
        chunk = np.empty(self.block_size + 1, dtype=np.int64)
        self._read(i * self.block_size, chunk)
        chunk = torch.from_numpy(chunk)
        return chunk[:-1], chunk[1:].clone()  # y its own tensor: changing one never changes the other

    def get_batch(self, indices):
        """Windows `indices` stacked: (x, y), each of shape (len(indices), block_size), in one buffer read."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        chunks = np.empty((len(indices), self.block_size + 1), dtype=np.int64)
        for row, i in enumerate(indices.tolist()):
            self._read(self._check_index(i, n) * self.block_size, chunks[row])
        chunks = torch.from_numpy(chunks)
        return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()

    def __repr__(self):
        return (f"TokenDataset({len(self.paths)} shards, {self.num_tokens:,} tokens, block_size={self.block_size}, "
                f"{len(self):,} windows, vocab_size={self.vocab_size})")
