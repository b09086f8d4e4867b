"""How text becomes tokens, in one place: the record of a tokenizer, and the tokenizer a record rebuilds.

A tokenizer travels as one plain record (a dict that JSON and weights_only loading both accept), which the Trainer
writes into every checkpoint and prepare_corpus into the meta.json of every corpus:

    {"type": "gpt2"}                                  GPT-2's BPE, shipped with mygpt
    {"type": "bpe", "encoder": {...},                 a vocabulary trained with mygpt.train_bpe (what its
     "merges": [[a, b], ...], "pattern": "..."}       encoder.json and vocab.bpe hold)
    {"type": "chars", "chars": ["\\n", " ", ...]}     one token per character, id = index in the list;
    {"type": "chars", "chars": [...], "eot": n}       with "eot": n = len(chars), id n ends a document
                                                      (as prepare_corpus writes character corpora)

`describe_tokenizer` makes the record from what a project has in hand and `load_tokenizer` gives back the tokenizer,
a `BPETokenizer` or a `CharTokenizer`, both with `encode(str) -> list[int]`, `encode_ordinary` (<|endoftext|> in the
text read as text), `decode(ids) -> str`, `decode_bytes(ids) -> bytes`, `vocab_size`, `eot_token` (the id of
<|endoftext|>, or None), `name` and `description` (the record).

meta.json files written before the record was one recorded a tokenizer by name and the sha256 of its vocabulary;
they are read still:

    {"name": "gpt2", "sha256": {"encoder.json": ..., "vocab.bpe": ...}}      read as {"type": "gpt2"}
    {"name": "chars", "chars": "\\n ab...", "sha256": ...}                  read as the "chars" record with "eot"
    {"name": "bpe", "sha256": {"encoder.json": ..., "vocab.bpe": ...}}       the hashes alone: compared
                                                                              (same_tokenizer), not rebuilt
"""

import hashlib
import json
import os
import tempfile
from collections import namedtuple
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch

from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, GPT2_SHA256, Encoder, _int_arg, _str_list, get_encoder
from mygpt.checkpoint import CheckpointError
from mygpt.downloads import sha256_file

TYPES = ("gpt2", "bpe", "chars")


class CharTokenizer:
    """One token per character: id i is chars[i]; with eot, id len(chars) ends a document and decodes as
    <|endoftext|> (text is always encoded character by character)."""

    def __init__(self, chars, eot=False):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars) if eot else None
        self.vocab_size = len(self.chars) + bool(eot)
        self.name = "characters + <|endoftext|>" if eot else "characters"
        self.description = {"type": "chars", "chars": self.chars}
        if eot:
            self.description["eot"] = self.eot_token

    def encode(self, text):
        """The ids of `text`; ValueError naming every character outside the vocabulary."""
        try:
            return self.encode_ordinary(text)
        except ValueError:
            unknown = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(map(repr, unknown[:20])) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            raise ValueError(f"the text has characters outside the model's vocabulary of {len(self.chars)} "
                             f"characters: {shown}") from None

    def encode_ordinary(self, text):
        """The ids of `text` (as `encode`: characters have no special tokens to read); ValueError naming the first
        character outside the vocabulary, as prepare_corpus reports it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return list(map(self.stoi.__getitem__, text))
        except KeyError as e:
            c = e.args[0]
            raise ValueError(f"character {c!r} (U+{ord(c):04X}) is not in the character vocabulary") from None

    def decode(self, ids):
        ids = [int(i) for i in ids]
        at = next((k for k, i in enumerate(ids) if not 0 <= i < self.vocab_size), None)
        if at is not None:
            raise ValueError(f"ids[{at}] = {ids[at]} is outside the character vocabulary "
                             f"(ids 0..{self.vocab_size - 1})")
        return "".join(ENDOFTEXT if i == self.eot_token else self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")


class BPETokenizer:
    """A byte-level BPE `Encoder` for models: text -> LongTensor of ids, ids -> text.

    Called, a string gives shape (1, T) and a list of n strings (n, T); strings of different lengths in one call need
    `pad_id`, which fills the shorter rows on the right; `encode` gives one text's ids as a list. Unlike GPT-2's
    encoder, `<|endoftext|>` in the text becomes its own id (50256) by default, since text fed to a model marks
    document ends that way; pass `allowed_special=()` to keep it as ordinary text, or "all" for every special token
    of the vocabulary (as load_tokenizer gives it).
    """

    def __init__(self, encoder=None, allowed_special=(ENDOFTEXT,)):
        if encoder is not None and not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be an Encoder (e.g. get_encoder() or Encoder.load(folder)), "
                            f"got {type(encoder).__name__}")
        self.encoder = encoder or get_encoder()
        self.encoder.encode("", allowed_special)  # refuses special tokens the vocabulary lacks, naming them
        self.allowed_special = allowed_special
        self.vocab_size = self.encoder.vocab_size
        self.eot_token = self.encoder.special_tokens.get(ENDOFTEXT)

    @cached_property
    def description(self):
        """The record of the vocabulary (see describe_tokenizer)."""
        return describe_tokenizer(self.encoder)

    @property
    def name(self):
        return "GPT-2 BPE" if self.description == {"type": "gpt2"} else "trained BPE"

    def __call__(self, text, pad_id=None):
        texts = [text] if isinstance(text, (str, bytes)) else _str_list(text, "text", "pass a str or a list of str")
        if pad_id is not None:
            pad_id = _int_arg(pad_id, "pad_id")
            if pad_id < -1:
                raise ValueError(f"pad_id must be a token id (>= 0) or -1 (ignored as a target), got {pad_id}")
        rows = [self.encode(t) for t in texts]
        width = max(map(len, rows), default=0)
        if pad_id is None and any(len(r) != width for r in rows):
            raise ValueError(f"the texts encode to different lengths {sorted({len(r) for r in rows})}; pass pad_id")
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)

    def encode(self, text):
        return self.encoder.encode(text, self.allowed_special)

    def encode_ordinary(self, text):
        return self.encoder.encode_ordinary(text)

    def decode(self, ids):
        """One sequence of ids (1-D tensor or array, list) -> str; a batch (2-D, or a list of lists) -> list of str."""
        if hasattr(ids, "dtype") and hasattr(ids, "ndim"):
            if ids.ndim not in (1, 2):
                raise ValueError(f"ids must be 1-D (one sequence) or 2-D (a batch), got shape {tuple(ids.shape)}")
            if ids.ndim == 2:
                return [self.encoder.decode(row) for row in ids]
        elif isinstance(ids, (list, tuple)) and ids and all(isinstance(row, (list, tuple)) for row in ids):
            return [self.encoder.decode(row) for row in ids]
        return self.encoder.decode(ids)

    def decode_bytes(self, ids):
        return self.encoder.decode_bytes(ids)


def describe_tokenizer(tokenizer):
    """The plain dict a checkpoint records for `tokenizer`: "gpt2", an `Encoder` (or `BPETokenizer`), a list of
    characters, a tokenizer from `load_tokenizer`, or a description (checked and returned as a copy)."""
    if isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        return dict(tokenizer.description)
    if isinstance(tokenizer, Encoder):
        gpt2 = get_encoder()
        if tokenizer is gpt2 or (tokenizer.pattern == gpt2.pattern and tokenizer.merges == gpt2.merges
                                 and tokenizer.encoder == gpt2.encoder):
            return {"type": "gpt2"}
        return _bpe_record(tokenizer)
    if tokenizer == "gpt2":
        return {"type": "gpt2"}
    if isinstance(tokenizer, str):
        raise TypeError(f"tokenizer {tokenizer!r}: a str names a shipped vocabulary ('gpt2' only); for a character "
                        f"vocabulary pass the list of characters, e.g. sorted(set(text))")
    if isinstance(tokenizer, Mapping):
        return load_tokenizer(tokenizer).description
    if isinstance(tokenizer, Sequence):
        return load_tokenizer({"type": "chars", "chars": list(tokenizer)}).description
    raise TypeError(f"cannot describe a tokenizer of type {type(tokenizer).__name__}: pass 'gpt2', an Encoder, "
                    f"a BPETokenizer or a list of characters")


def record_tokenizer(tokenizer):
    """What a checkpoint records for `tokenizer`: the record of a text tokenizer (anything describe_tokenizer takes),
    a dict as it is (a record, or a project's own such as image-gpt's palette), None for none."""
    if tokenizer is None:
        return None
    return dict(tokenizer) if isinstance(tokenizer, Mapping) else describe_tokenizer(tokenizer)


def load_tokenizer(description):
    """The tokenizer that `description` (a record made by `describe_tokenizer`, or an older meta.json's) names,
    checked with clear errors."""
    description = _current(description)
    if _hashes_only(description):
        raise ValueError("this tokenizer record, from the meta.json of a corpus prepared by an older mygpt, holds the "
                         "sha256 of a trained BPE vocabulary but not the vocabulary; load its folder with "
                         "mygpt.get_encoder(folder), or prepare the corpus again to record it whole")
    if description is None:
        raise ValueError("no tokenizer recorded: the checkpoint was written without Trainer(..., tokenizer=...); "
                         "pass mygpt.tokenizer.describe_tokenizer(...) of its vocabulary when training")
    if not isinstance(description, Mapping):
        raise TypeError(f"a tokenizer description must be a dict such as {{'type': 'gpt2'}}, "
                        f"got {type(description).__name__}")
    kind = description.get("type")
    if kind not in TYPES:
        raise ValueError(f"tokenizer description: unknown type {kind!r}; choose one of {list(TYPES)}")
    allowed = {"gpt2": {"type"}, "bpe": {"type", "encoder", "merges", "pattern"},
               "chars": {"type", "chars", "eot"}}[kind]
    unknown = sorted(set(description) - allowed)
    if unknown:
        raise ValueError(f"tokenizer description of type {kind!r}: unknown keys {unknown}; it takes {sorted(allowed)}")
    if kind == "gpt2":
        return BPETokenizer(get_encoder(), allowed_special="all")
    if kind == "bpe":
        return _load_bpe(description)
    return _load_chars(description)


def _load_bpe(description):
    for key in ("encoder", "merges"):
        if key not in description:
            raise ValueError(f"tokenizer description of type 'bpe' lacks {key!r} (what encoder.json / vocab.bpe hold)")
    pattern = description.get("pattern", GPT2_PATTERN)
    if not isinstance(pattern, str):
        raise TypeError(f"tokenizer description: 'pattern' must be a regular expression (str), got {pattern!r}")
    try:
        encoder = Encoder(description["encoder"], description["merges"], pattern=pattern)
    except (TypeError, ValueError) as err:
        raise type(err)(f"tokenizer description of type 'bpe': {err}") from err
    return BPETokenizer(encoder, allowed_special="all")


def _bpe_record(encoder):
    return {"type": "bpe", "encoder": dict(encoder.encoder), "merges": [list(m) for m in encoder.merges],
            "pattern": encoder.pattern}


def _load_chars(description):
    chars = description.get("chars")
    if isinstance(chars, str) or not isinstance(chars, Sequence) or not chars:
        raise ValueError(f"tokenizer description of type 'chars': 'chars' must be a non-empty list of characters, "
                         f"got {chars!r}")
    for i, c in enumerate(chars):
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"tokenizer description of type 'chars': chars[{i}] = {c!r} is not one character")
    seen = {}
    for i, c in enumerate(chars):
        if c in seen:
            raise ValueError(f"tokenizer description of type 'chars': {c!r} appears twice (chars[{seen[c]}] and "
                             f"chars[{i}]); each character needs one id")
        seen[c] = i
    eot = description.get("eot")
    if eot is not None and (isinstance(eot, bool) or eot != len(chars)):
        raise ValueError(f"tokenizer description of type 'chars': 'eot' must be len(chars) = {len(chars)} (the id "
                         f"after the characters), got {eot!r}")
    return CharTokenizer(chars, eot=eot is not None)


# ---------------------------------------------------------------------------------------------------- older records

def _hashes_only(record):
    """Whether `record` is an older meta.json's {"name", "sha256"} (as _current leaves it: a trained BPE's)."""
    return isinstance(record, Mapping) and "type" not in record and {"name", "sha256"} <= record.keys()


def _current(record):
    """The record of today for an older meta.json's {"name", "sha256"} where it names the vocabulary (GPT-2's by its
    hashes; characters, which such corpora always ended with the id after them); anything else as it is."""
    if not _hashes_only(record):
        return record
    if record["sha256"] == GPT2_SHA256:  # prepare recorded a copy of GPT-2's vocabulary as "bpe"
        return {"type": "gpt2"}
    if record["name"] == "chars" and isinstance(record.get("chars"), str):
        return {"type": "chars", "chars": list(record["chars"]), "eot": len(record["chars"])}
    return record


class _Fingerprint(namedtuple("_Fingerprint", "name sha256 vocab_size")):
    """See `fingerprint`; as a str, 'bpe (sha256 1a2b3c4d5e6f..., 300 tokens)' for error messages."""

    def __str__(self):
        sha256 = self.sha256 if isinstance(self.sha256, str) else self.sha256["encoder.json"]
        return f"{self.name} (sha256 {sha256[:12]}..., {self.vocab_size} tokens)"


def fingerprint(tokenizer, vocab_size=None):
    """What tells vocabularies apart, as an older meta.json recorded it: "gpt2", "bpe" or "chars", the sha256 of the
    vocabulary (of the encoder.json and vocab.bpe that Encoder.save writes; of the characters, joined) and the
    vocabulary size (for an older record of hashes alone, `vocab_size`: the one recorded beside it).
    tokenizer: a record of either form or anything describe_tokenizer takes. Its str names it in errors."""
    if _hashes_only(_current(tokenizer)):
        return _Fingerprint(tokenizer["name"], tokenizer["sha256"], vocab_size)
    loaded = load_tokenizer(describe_tokenizer(tokenizer))
    if isinstance(loaded, CharTokenizer):
        text = "".join(loaded.chars)
        return _Fingerprint("chars", hashlib.sha256(text.encode("utf-8")).hexdigest(), loaded.vocab_size)
    if loaded.description == {"type": "gpt2"}:
        return _Fingerprint("gpt2", GPT2_SHA256, loaded.vocab_size)  # Encoder.save writes exactly the shipped files
    with tempfile.TemporaryDirectory() as folder:
        loaded.encoder.save(folder)
        hashes = {name: sha256_file(Path(folder) / name) for name in ("encoder.json", "vocab.bpe")}
    return _Fingerprint("bpe", hashes, loaded.vocab_size)


def same_tokenizer(a, b, vocab_size=None):
    """Whether `a` and `b` (records of either form, or anything describe_tokenizer takes) are the same vocabulary:
    equal records, else equal fingerprints (an older record of hashes alone, whose size `vocab_size` gives if
    known, compares by its hashes)."""
    records = [_current(x) if isinstance(x, Mapping) else describe_tokenizer(x) for x in (a, b)]
    if records[0] == records[1]:
        return True
    first, second = fingerprint(records[0], vocab_size), fingerprint(records[1], vocab_size)
    sizes = {first.vocab_size, second.vocab_size} - {None}
    return first.sha256 == second.sha256 and len(sizes) <= 1


# ---------------------------------------------------------------------------------------------------- from a name

def text_tokenizer(ckpt, path):
    """The tokenizer the checkpoint `ckpt` (read from `path`) records, with errors that say why its text cannot be
    read or written."""
    description = ckpt.get("tokenizer")
    if description is None:
        raise ValueError(f"{path} records no tokenizer, so its text cannot be read or written; train with "
                         f"Trainer(..., tokenizer=mygpt.tokenizer.describe_tokenizer(...))")
    if isinstance(description, dict) and description.get("type") not in TYPES:
        raise ValueError(f"{path} records a tokenizer of type {description.get('type')!r}, not one of text "
                         f"({', '.join(TYPES)}); use the project that trained it")
    tokenizer = load_tokenizer(description)
    vocab_size = ckpt["model_config"]["vocab_size"]
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{path}: its tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens, "
                              f"more than the model's vocab_size {vocab_size}")
    return tokenizer


def prepare_tokenizer(name):
    """What `mygpt prepare --tokenizer NAME` names, as prepare_corpus takes it: 'gpt2', a folder holding a trained
    vocabulary's encoder.json and vocab.bpe, or a JSON list of characters."""
    if name == "gpt2":
        return name
    if os.path.isdir(name):
        return get_encoder(name)
    if name.endswith(".json") and os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            try:
                chars = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"--tokenizer {name} is not JSON ({err}); it must hold a list of characters, "
                                 f"e.g. [\"a\", \"b\"]") from None
        if not isinstance(chars, list):
            raise ValueError(f"--tokenizer {name} must hold a JSON list of characters, e.g. [\"a\", \"b\"]")
        return chars
    raise ValueError(f"--tokenizer {name!r}: give 'gpt2', a folder holding encoder.json and vocab.bpe, or a .json "
                     f"file holding a list of characters")
