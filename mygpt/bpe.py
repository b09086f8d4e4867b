"""GPT-2's byte-level byte-pair encoding, written from the algorithm and fast in pure Python.

Text is split into pre-tokens by GPT-2's regular expression; each pre-token's UTF-8 bytes start as one token per byte
and are merged pairwise, lowest merge rank first, until no ranked pair is left. Because the result depends only on the
pre-token, it is cached per pre-token, and a warm encode is one regex pass plus one dict lookup per pre-token.
Long pre-tokens (base64, DNA, minified code: runs without spaces) merge through a heap in O(n log n).
"""

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from heapq import heappop, heappush
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import regex

from mygpt.downloads import sha256_file
from mygpt.workers import ordered_map

# GPT-2's pre-tokeniser: common English contractions, then runs of letters, of digits or of other symbols (each may
# take one leading space), then whitespace; `\s+(?!\S)` leaves the last space of a run to start the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
# The vocabulary files shipped in mygpt/vocab/gpt2, byte-identical to OpenAI's release (see the README there).
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_NO_MERGE = (float("inf"), -1, -1, -1)
# Pre-tokens of at least this many bytes merge in rank order (merge_in_rank_order); shorter ones by whole passes, which
# take fewer steps on a few bytes. Measured crossover: 8 to 12 bytes (`python bench/bench_bpe.py crossover`).
HEAP_FROM_BYTES = 12
# Longer pre-tokens are not cached: they rarely repeat, and the cache's memory is bounded by its count of entries.
_CACHE_MAX_CHARS = 256


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


@lru_cache(maxsize=None)
def _byte_alphabet():
    return frozenset(bytes_to_unicode().values())


def _unicode_to_bytes(token):
    """The bytes that a vocabulary string stands for (the inverse of `bytes_to_unicode`)."""
    inverse = _unicode_to_byte()
    return bytes(inverse[c] for c in token)


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


def merge_in_rank_order(ids, rank_of, merge_of):
    """GPT-2's merges of `ids` in O(n log n): the result of repeating `merge_pair` with the lowest-ranked pair.

    `rank_of` maps a pair of ids to its merge's rank and `merge_of` a rank to (rank, merged id, left id, right id).
    The parts form a linked list over the positions of `ids` (a part is named by the position of its first byte, so
    positions order parts left to right). Candidate merges wait in `where`, rank -> positions of the pair's left part,
    and a heap of those ranks gives the lowest: a pass takes all of its positions in order, which repeats
    `merge_pair`'s left to right scan, and skips one whose parts have changed since (in "aaa", the second "a a" once
    the first has merged). Pairs that a pass creates have other ranks, so they wait for a later pass. One heap entry
    per rank instead of per pair: a pass then walks a sorted list, several times faster than a pop per pair.
    """
    n = len(ids)
    after = list(range(1, n + 1))  # after[i]: the part following part i (n: none)
    before = list(range(-1, n - 1))  # before[i]: the part preceding part i (-1: none)
    where = {}
    ranks = []

    def candidate(i, pair):
        rank = rank_of.get(pair)
        if rank is not None:
            positions = where.get(rank)
            if positions is None:
                where[rank] = [i]
                heappush(ranks, rank)
            else:
                positions.append(i)

    for i, pair in enumerate(zip(ids, ids[1:])):
        candidate(i, pair)
    while ranks:
        rank = heappop(ranks)
        _, merged, left, right = merge_of[rank]
        positions = where.pop(rank)
        positions.sort()
        for i in positions:
            j = after[i]
            if ids[i] != left or j == n or ids[j] != right:
                continue
            ids[i], ids[j] = merged, -1  # part j joins part i; -1 marks it gone
            k = after[i] = after[j]
            if k < n:
                before[k] = i
                candidate(i, (merged, ids[k]))
            if before[i] >= 0:
                candidate(before[i], (ids[before[i]], merged))
    return [t for t in ids if t >= 0]


class _PieceCache(dict):
    """Pre-token -> ids; a miss runs the BPE. Cleared when full, so memory stays bounded on endless unique text."""

    def __init__(self, encode_piece, limit):
        super().__init__()
        self.encode_piece = encode_piece
        self.limit = limit

    def __missing__(self, piece):
        if len(piece) > _CACHE_MAX_CHARS:
            return self.encode_piece(piece)
        if len(self) >= self.limit:
            self.clear()
        ids = self[piece] = self.encode_piece(piece)
        return ids


class Encoder:
    """A byte-level BPE vocabulary: `encode` text to ids and `decode` ids to text.

    `encoder` maps each token, written in the `bytes_to_unicode` alphabet, to its id; `merges` lists the pairs of
    tokens in rank order. Tokens of `encoder` that are neither a byte nor made by a merge are special tokens, such as
    GPT-2's `<|endoftext|>`, and may not be two other tokens joined (that is the token of a missing merge). Both
    are checked (see `_check_vocabulary`); a bad one raises ValueError or TypeError.
    """

    def __init__(self, encoder, merges, pattern=GPT2_PATTERN, cache_size=1 << 18):
        self._build(*_check_vocabulary(encoder, merges), pattern, cache_size)

    def _build(self, encoder, merges, pattern=GPT2_PATTERN, cache_size=1 << 18):
        """The tables behind encode and decode, from a checked vocabulary."""
        self.encoder, self.merges = encoder, merges
        self.pattern = pattern
        self._split = _compiled(pattern, "pattern").findall
        cache_size = _int_arg(cache_size, "cache_size")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 (pre-tokens kept), got {cache_size}")
        self._byte_ids = [self.encoder[c] for _, c in sorted(bytes_to_unicode().items())]
        self._merge_table = self._build_merge_table()
        self._rank_of = {pair: entry[0] for pair, entry in self._merge_table.items()}
        self._merge_of = {entry[0]: entry for entry in self._merge_table.values()}
        made = set(bytes_to_unicode().values()) | {a + b for a, b in self.merges}
        self.special_tokens = {t: i for t, i in self.encoder.items() if t not in made}
        self._token_bytes = {i: _unicode_to_bytes(t) for t, i in self.encoder.items() if t in made}
        self._bytes_to_id = {b: i for i, b in self._token_bytes.items()}
        self._token_bytes.update((i, t.encode("utf-8")) for t, i in self.special_tokens.items())
        self.vocab_size = len(self.encoder)
        self._decode_table = self._build_decode_table()
        self._cache = _PieceCache(self._encode_piece, cache_size)

    def _build_merge_table(self):
        """(left id, right id) -> (rank, merged id, left id, right id).

        The BPE works on ints, whose pairs hash faster than strings; the value repeats the pair so that the minimum
        over a pre-token's pairs says both what to merge and into what.
        """
        table = {}
        for rank, (a, b) in enumerate(self.merges):
            left, right = self.encoder[a], self.encoder[b]
            table[left, right] = (rank, self.encoder[a + b], left, right)
        return table

    def _build_decode_table(self):
        """id -> the token's bytes, each byte as one Latin-1 character, in a list.

        A list indexes faster than a dict, and joining a million short str is several times faster than joining as
        many bytes objects (bytes.join allocates a buffer descriptor per item). A list also takes negative indices,
        so `decode_bytes` refuses those before the lookup.
        """
        table = [None] * self.vocab_size
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
        ids = list(map(self._byte_ids.__getitem__, data))
        if len(ids) >= HEAP_FROM_BYTES:
            return tuple(merge_in_rank_order(ids, self._rank_of, self._merge_of))
        return tuple(self._merge(ids))

    def _merge(self, ids, on_step=None):
        """Apply the lowest-ranked merge present, everywhere it occurs, until no pair of `ids` has a merge.

        One pass per merge, over the whole pre-token: quadratic in its length, but the fewest steps on a short one.
        """
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
        _require_str(text, "text")
        return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))

    def encode(self, text, allowed_special=()):
        """Ids of `text`. Special tokens named in `allowed_special` (or all, with "all") map to their own ids; any
        other special-token text is ordinary text, as in GPT-2."""
        _require_str(text, "text")
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
        """The set of special tokens that `allowed_special` ("all", or a collection of them) names."""
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str) or not _is_collection(allowed_special):
            raise TypeError(f'allowed_special must be "all" or a set of special tokens (e.g. {{"<|endoftext|>"}}), '
                            f"got {allowed_special!r}")
        for token in allowed_special:
            _require_str(token, "each token of allowed_special")
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names {sorted(unknown)}, not special tokens of this vocabulary; "
                             f"it has {sorted(self.special_tokens)}")
        return set(allowed_special)

    def decode_bytes(self, ids):
        """The bytes that `ids` (ints: a list, tuple, 1-D integer array or tensor) stand for."""
        ids = _id_list(ids, "ids")
        try:
            # a negative id would index the table from its end and decode as another token; min adds about a quarter
            # to a decode's time (and raises TypeError on a non-number, as the lookup would)
            if ids and min(ids) < 0:
                raise IndexError
            return "".join(map(self._decode_table.__getitem__, ids)).encode("latin-1")
        except (IndexError, TypeError):
            _check_ints(ids, "ids")
            at, bad = next((k, i) for k, i in enumerate(ids) if not 0 <= i < self.vocab_size)
            raise ValueError(f"ids[{at}] = {bad!r} is not a token id of this vocabulary (ids 0..{self.vocab_size - 1})"
                             ) from None

    def decode(self, ids):
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_and_show_work(self, text):
        """Every step of encoding `text`, for learning how BPE works.

        Returns one dict per pre-token: the pre-token, its bytes written in the vocabulary's alphabet, the list of
        token strings after each merge pass (starting from single bytes), and its ids.
        """
        _require_str(text, "text")
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
        round trip and its cache sees text that shares words. The workers are prepare_corpus's (mygpt/workers.py):
        forked where the platform can, so they start with this encoder and its cache at no cost.
        """
        texts = _str_list(texts, "texts", "for one text, use encode")
        num_workers = _int_arg(num_workers, "num_workers")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (1 encodes in this process), got {num_workers}")
        self._allowed(allowed_special)
        workers = max(1, min(num_workers, len(texts)))
        with ordered_map(_encode_texts, (self, allowed_special), workers, "before encode_batch finished (fewer "
                         "num_workers take less memory)") as encoded:
            return [ids for group in encoded(_contiguous_groups(texts, workers)) for ids in group]

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
        """The encoder saved in `directory` as `encoder.json` and `vocab.bpe` (GPT-2's formats).

        Both files are checked for structure first; every error names the file (and the line, for vocab.bpe).
        """
        directory = _path_arg(directory, "directory")
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory; pass the folder holding encoder.json and "
                                    "vocab.bpe")
        encoder_path, merges_path = directory / "encoder.json", directory / "vocab.bpe"
        checked = _check_vocabulary(_read_encoder_json(encoder_path), _read_vocab_bpe(merges_path),
                                   encoder_name=str(encoder_path),
                                   merge_name=lambda rank: f"{merges_path} line {rank + 2}")
        encoder = cls.__new__(cls)  # checked once, with the files' names, instead of again by __init__
        encoder._build(*checked, **kwargs)
        return encoder


def _check_vocabulary(encoder, merges, encoder_name="encoder", merge_name=lambda rank: f"merges[{rank}]"):
    """(encoder as a dict of str -> int, merges as a list of str pairs) after checking that they form a byte-level
    BPE vocabulary: ids number the tokens 0..N-1 with none shared, all 256 byte tokens are present, every merge
    joins two tokens of the encoder into a third, and each token other than the bytes and the special tokens is made
    by exactly one merge. Errors name `encoder_name` and `merge_name(rank)`."""
    if not isinstance(encoder, Mapping):
        raise TypeError(f"{encoder_name} must map each token (str) to its id (int), got {type(encoder).__name__}")
    checked = {}
    for token, i in encoder.items():
        if not isinstance(token, str) or not token:
            raise ValueError(f"{encoder_name}: token {token!r} must be a non-empty str")
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{encoder_name}: the id of token {token!r} must be an int, got {i!r}")
        checked[token] = int(i)
    owner = {}
    for token, i in checked.items():
        if i in owner:
            raise ValueError(f"{encoder_name}: tokens {owner[i]!r} and {token!r} share id {i}; "
                             "each token needs its own")
        owner[i] = token
    missing = [f"{c!r} (byte {b})" for b, c in bytes_to_unicode().items() if c not in checked]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{encoder_name} lacks byte tokens {', '.join(missing[:5])}{more}: a byte-level vocabulary "
                         "holds all 256 bytes")
    if isinstance(merges, (str, bytes, Mapping)) or not _is_collection(merges):
        raise TypeError(f"merges must be a list of (left, right) token pairs, got {type(merges).__name__}")
    checked_merges, made_by = [], {}
    for rank, merge in enumerate(merges):
        if isinstance(merge, str) or not _is_collection(merge) or len(merge) != 2:
            raise ValueError(f"{merge_name(rank)}: a merge must be two tokens (left, right), got {merge!r}")
        pair = tuple(merge)
        merged = "".join(pair)
        if not (pair[0] in checked and pair[1] in checked and merged in checked
                and _byte_alphabet().issuperset(merged)):
            raise ValueError(f"{merge_name(rank)}: merge {' '.join(pair)!r} " + _what_is_wrong(pair, checked,
                                                                                              encoder_name))
        if merged in made_by:
            earlier = made_by[merged]
            raise ValueError(f"{merge_name(rank)}: merge {' '.join(pair)!r} " + (
                f"repeats {merge_name(earlier)}" if checked_merges[earlier] == pair
                else f"makes {merged!r}, which {merge_name(earlier)} already makes") + "; delete one of the two")
        made_by[merged] = rank
        checked_merges.append(pair)
    n = len(checked)
    outside = next((t for t, i in checked.items() if not 0 <= i < n), None)
    if outside is not None:
        raise ValueError(f"{encoder_name}: token {outside!r} has id {checked[outside]}, outside 0..{n - 1}: the ids "
                         f"of {n} tokens must number them from 0")
    unmade = _first_unmade_token(checked, made_by)
    if unmade is not None:
        token, left, right = unmade
        # the line where its merge belongs if the merges make tokens in id order, as GPT-2's and train_bpe's do:
        # the first missing line of a file cut short
        at = sum(checked[t] < checked[token] for t in made_by)
        raise ValueError(f"{merge_name(at)}: no merge makes token {token!r} (id {checked[token]}) of {encoder_name}, "
                         f"though it joins tokens {left!r} and {right!r} and so cannot be a special token: the merges "
                         f"are cut short or lack this line, where its merge belongs by the order of the ids; use the "
                         f"merges that came with {encoder_name} (and special tokens that are not two tokens joined)")
    return checked, checked_merges


def _first_unmade_token(encoder, made):
    """(token, left, right) for the lowest-id token that no merge in `made` makes, although it joins two ordinary
    tokens (bytes or made by merges) `left` and `right`; None if there is none.

    Tokens that no merge makes are taken for special tokens, so without this check merges cut short would turn the
    tokens of the missing merges into special tokens and encode text into other ids, silently. A real special token
    such as "<|endoftext|>" is no two ordinary tokens joined ("<|endoftext" and "|>" are not tokens, and so on).
    """
    def ordinary(token):
        return token in made or token in _byte_alphabet()

    for token in sorted(encoder.keys() - made.keys() - _byte_alphabet(), key=encoder.get):
        k = next((k for k in range(1, len(token)) if ordinary(token[:k]) and ordinary(token[k:])), None)
        if k is not None:
            return token, token[:k], token[k:]
    return None


def _what_is_wrong(pair, encoder, encoder_name):
    for token in (*pair, "".join(pair)):
        if token not in encoder:
            return f"needs token {token!r}, which {encoder_name} lacks (it has {len(encoder)} tokens)"
    outside = sorted(set("".join(pair)) - _byte_alphabet())
    return f"has characters {outside} outside the byte alphabet (see bytes_to_unicode)"


def _read_encoder_json(path):
    """encoder.json as a dict, refusing a duplicated token (which `json.load` would silently keep the last of)."""
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{path}: token {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        with open(path, encoding="utf-8") as f:
            encoder = json.load(f, object_pairs_hook=no_duplicates)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a vocabulary folder holds encoder.json and vocab.bpe") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(encoder, dict):
        raise ValueError(f"{path} must hold a JSON object of token -> id, got a {type(encoder).__name__}")
    return encoder


def _read_vocab_bpe(path):
    """The merges of vocab.bpe: a '#version' header line, then one 'left right' pair per line, each line ended by a
    newline (GPT-2's own reader drops the last line, so a file cut short would lose a merge there and not here)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a vocabulary folder holds encoder.json and vocab.bpe") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if not lines[0].startswith("#version"):
        raise ValueError(f"{path} line 1 must be the header '#version: 0.2', got {lines[0][:40]!r}: "
                         "is this a vocab.bpe file?")
    if lines[-1]:
        raise ValueError(f"{path} does not end with a newline: the file may be cut short (line {len(lines)} is "
                         f"{lines[-1][:40]!r})")
    merges = []
    for number, line in enumerate(lines[1:-1], start=2):
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path} line {number}: a merge line is two tokens separated by one space, "
                             f"got {line[:40]!r}")
        merges.append(tuple(pair))
    return merges


def _compiled(pattern, name):
    _require_str(pattern, name)
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"{name} is not a valid regular expression: {e}") from None


def _require_str(text, name):
    if not isinstance(text, str):
        hint = "; decode bytes to text first, e.g. data.decode('utf-8')" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{name} must be a str, got {type(text).__name__}{hint}")


def _is_collection(value):
    return hasattr(value, "__iter__") and hasattr(value, "__len__")


def _str_list(texts, name, hint):
    """`texts` (a list or tuple of str) as a list, or TypeError naming the argument or its first bad item."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}; {hint}")
    for k, text in enumerate(texts):
        _require_str(text, f"{name}[{k}]")
    return list(texts)


def _int_arg(value, name):
    """`value` as an int (numpy integers too, never bools), or TypeError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _path_arg(value, name):
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or path, got {type(value).__name__}")
    return Path(value)


def _id_list(ids, name):
    """`ids` as a list, from a list, tuple, iterable, or 1-D integer array or tensor; bools refused.

    A bool would index as 0 or 1 and decode silently; any other non-int fails the table lookup, and `_check_ints`
    then names it. Looking for bools costs about a third of decoding a list (arrays and tensors convert to ints).
    """
    if hasattr(ids, "dtype") and hasattr(ids, "ndim"):  # a numpy array or a torch tensor
        integers = "int" in str(ids.dtype)
        if not integers and ids.dtype != object:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one sequence), got shape {tuple(ids.shape)}")
        if integers:
            return ids.tolist()
        ids = ids.tolist()  # numpy holds ints beyond 64 bits as objects: their items are checked as a list's
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
    ids = ids if isinstance(ids, list) else list(ids)
    if bool in map(type, ids):
        _check_ints(ids, name)
    return ids


def _check_ints(ids, name):
    """TypeError naming the first item of `ids` that is not an int (numpy integers are ints, bools are not)."""
    for k, i in enumerate(ids):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            nested = "; decode one sequence at a time" if isinstance(i, (list, tuple)) else ""
            raise TypeError(f"{name}[{k}] is {i!r} ({type(i).__name__}): token ids must be ints{nested}")


def _encode_texts(state, texts):
    encoder, allowed_special = state
    return [encoder.encode(t, allowed_special) for t in texts]


def _contiguous_groups(texts, n):
    """`texts` cut, in order, into at most `n` groups of about equal total length."""
    total = sum(map(len, texts)) or 1
    groups, done = [[] for _ in range(n)], 0
    for text in texts:
        groups[min(n - 1, done * n // total)].append(text)
        done += len(text)
    return [g for g in groups if g]


def get_encoder(name="gpt2"):
    """The encoder named `name`: "gpt2" (shipped with mygpt, loaded once with no network access and shared by all
    callers) or a folder holding encoder.json and vocab.bpe (loaded by `Encoder.load`)."""
    if name == "gpt2":
        return _shipped_gpt2()
    path = _path_arg(name, "name")
    if path.is_dir():
        return Encoder.load(path)
    raise ValueError(f"unknown vocabulary {name!r}: mygpt ships only 'gpt2'; for your own, pass the folder holding "
                     "its encoder.json and vocab.bpe")


@lru_cache(maxsize=None)
def _shipped_gpt2():
    return _load_verified(VOCAB_DIR / "gpt2", GPT2_SHA256)


def _load_verified(directory, sha256):
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
