"""How a checkpoint's text becomes tokens: a plain description recorded with the weights, and the tokenizer it names.

A checkpoint holds only values that weights_only loading accepts, so the tokenizer travels as a small dict:

    {"type": "gpt2"}                                  GPT-2's BPE, shipped with mygpt
    {"type": "bpe", "encoder": {...},                 a vocabulary trained with mygpt.train_bpe (what its
     "merges": [[a, b], ...], "pattern": "..."}       encoder.json and vocab.bpe hold)
    {"type": "chars", "chars": ["\\n", " ", ...]}     one token per character, id = index in the list;
    {"type": "chars", "chars": [...], "eot": n}       with "eot": n = len(chars), id n ends a document
                                                      (as mygpt.data.prepare_corpus writes character corpora)

`describe_tokenizer` makes the dict from what a project has in hand and `load_tokenizer` gives back an object with
`encode(str) -> list[int]`, `decode(ids) -> str`, `decode_bytes(ids) -> bytes`, `vocab_size`, `eot_token` (the id of
<|endoftext|>, or None) and `name`.
"""

from collections.abc import Mapping, Sequence

from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, Encoder, get_encoder

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
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = ", ".join(map(repr, unknown[:20])) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            raise ValueError(f"the text has characters outside the model's vocabulary of {len(self.chars)} "
                             f"characters: {shown}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        at = next((k for k, i in enumerate(ids) if not 0 <= i < self.vocab_size), None)
        if at is not None:
            raise ValueError(f"ids[{at}] = {ids[at]} is outside the character vocabulary "
                             f"(ids 0..{self.vocab_size - 1})")
        return "".join(ENDOFTEXT if i == self.eot_token else self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")


class BPETextTokenizer:
    """A byte-level BPE `Encoder` with its special tokens (such as <|endoftext|>) written as text in the input."""

    def __init__(self, encoder, name, description):
        self.encoder = encoder
        self.vocab_size = encoder.vocab_size
        self.eot_token = encoder.special_tokens.get(ENDOFTEXT)
        self.name = name
        self.description = description

    def encode(self, text):
        # text fed to a model marks document ends with <|endoftext|>, as BPETokenizer does by default
        return self.encoder.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.encoder.decode([int(i) for i in ids])

    def decode_bytes(self, ids):
        return self.encoder.decode_bytes([int(i) for i in ids])


def describe_tokenizer(tokenizer):
    """The plain dict a checkpoint records for `tokenizer`: "gpt2", an `Encoder` (or `BPETokenizer`), a list of
    characters, a tokenizer from `load_tokenizer`, or a description (checked and returned as a copy)."""
    if isinstance(tokenizer, (CharTokenizer, BPETextTokenizer)):
        return dict(tokenizer.description)
    if isinstance(tokenizer, BPETokenizer):
        tokenizer = tokenizer.encoder
    if isinstance(tokenizer, Encoder):
        gpt2 = get_encoder()
        if tokenizer is gpt2 or (tokenizer.pattern == gpt2.pattern and tokenizer.merges == gpt2.merges
                                 and tokenizer.encoder == gpt2.encoder):
            return {"type": "gpt2"}
        return {"type": "bpe", "encoder": dict(tokenizer.encoder), "merges": [list(m) for m in tokenizer.merges],
                "pattern": tokenizer.pattern}
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


def load_tokenizer(description):
    """The tokenizer that `description` (a dict made by `describe_tokenizer`) names, checked with clear errors."""
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
        return BPETextTokenizer(get_encoder(), "GPT-2 BPE", {"type": "gpt2"})
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
    described = {"type": "bpe", "encoder": dict(encoder.encoder), "merges": [list(m) for m in encoder.merges],
                 "pattern": pattern}
    return BPETextTokenizer(encoder, "trained BPE", described)


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
