"""Preparing a corpus: text files, JSON lines, Parquet or a Hugging Face dataset -> token shards and meta.json.

`prepare_corpus` reads the sources as documents (sources), cuts long ones into pieces where the tokens do not change
(tokenizers), groups the pieces into units that worker processes encode, each document followed by the end-of-text id
and sent to the train or val split by a hash of its index (encoding), and writes the units' tokens, in order, into
shards of `shard_tokens` tokens (the format of mygpt/data.py), then meta.json, which marks the corpus finished
(prepare). The output is byte-identical for any number of workers, and a rerun finishes an interrupted run.
"""

import glob as globlib
import hashlib
import importlib
import json
import os
import re
import signal
import threading
import warnings
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import numpy as np
import regex
from tqdm.auto import tqdm

from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, Encoder, get_encoder
from mygpt.data import MAX_SHARD_TOKENS, ShardError, _format_of, _ShardFile, read_header
from mygpt.tokenizer import CharTokenizer, describe_tokenizer, load_tokenizer, same_tokenizer
from mygpt.utils import atomic_path, exclusive, jsonl_values
from mygpt.workers import ordered_map

_SPLITS = ("train", "val")
_PIECE_CHARS = 1 << 20  # documents are encoded in pieces of about this many characters ...
_UNIT_CHARS = 1 << 20   # ... and sent to the workers in units of about this many
_MAX_PIECE_CHARS = 4 << 20  # a pre-token longer than this (a run of letters, say) is cut every this many characters
_DATA_EXTRA = "pip install 'mygpt[data]'"
# what a dead encoding process leaves unfinished, and what to do
_UNFINISHED = "before prepare finished; run the same prepare again to finish it (fewer num_workers take less memory)"


# ---------------------------------------------------------------------------------------------------- tokenizers

# A cut at k leaves GPT-2's pre-tokens, hence its tokens, as they are when a pre-token of the whole text ends at k
# whatever follows and text[k-1] is no whitespace (whose last pre-token would depend on what follows, `\s+(?!\S)`):
# before whitespace (only its right neighbour can join a space), or where letters, digits and other symbols meet
# (each class makes its own runs), except between an apostrophe and a letter ('s, 't, 're ... are pre-tokens).
# The regex has no lookbehind, so the piece after k splits as the whole text does from k on.
_BOUNDARY = (r"(?<=\S)(?=\s)|(?<=\p{L})(?=[^\s\p{L}])|(?<=\p{N})(?=[^\s\p{N}])"
             r"|(?<=[^\s\p{L}\p{N}'])(?=[\p{L}\p{N}])|(?<=')(?=\p{N})")
_LAST_BOUNDARY, _NEXT_BOUNDARY = regex.compile(_BOUNDARY, flags=regex.REVERSE), regex.compile(_BOUNDARY)


def _cut_gpt2(text, start):
    """The last pre-token boundary before _PIECE_CHARS, else the first one after it (a piece holds a long pre-token
    whole), or None where text has none; `start` > 0: a search of text[:start] found none, go on from there."""
    match = None if start else _LAST_BOUNDARY.search(text, 1, _PIECE_CHARS)
    match = match or _NEXT_BOUNDARY.search(text, max(start, _PIECE_CHARS))
    return match.start() if match else None


def _cut_anywhere(text, start):
    return _PIECE_CHARS  # characters encode one by one, so any cut is exact


def _resolve_tokenizer(tokenizer):
    """prepare_corpus's `tokenizer`, checked, as the tokenizer (mygpt.tokenizer) that encodes the corpus and whose
    record meta.json keeps: rebuilt from that record, so that the record is what made the shards."""
    if isinstance(tokenizer, str):
        if tokenizer != "gpt2":
            raise ValueError(f"tokenizer must be 'gpt2', an Encoder or a list of characters, got {tokenizer!r}; "
                             f"for a character vocabulary pass a list, e.g. sorted(set(text))")
        return _resolve_tokenizer(get_encoder())
    if isinstance(tokenizer, Encoder):
        if ENDOFTEXT not in tokenizer.special_tokens:
            raise ValueError(f"the encoder has no {ENDOFTEXT} token to end documents with; "
                             f"train it with special_tokens=({ENDOFTEXT!r},)")
        return load_tokenizer(describe_tokenizer(tokenizer))
    if isinstance(tokenizer, (list, tuple)):
        chars = list(tokenizer)
        bad = next((c for c in chars if not (isinstance(c, str) and len(c) == 1)), None)
        if bad is not None or not chars:
            raise ValueError(f"a character vocabulary is a non-empty list of single characters; found {bad!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("the character vocabulary lists a character twice")
        # one id past the characters ends each document, as <|endoftext|> does for BPE
        return CharTokenizer(chars, eot=True)
    raise TypeError(f"tokenizer must be 'gpt2', an Encoder or a list of characters, got {type(tokenizer).__name__}")


def _cut_of(tok):
    """Where the documents of `tok` may be cut (see _pieces): characters anywhere, GPT-2's pattern at _cut_gpt2,
    another pattern nowhere."""
    if isinstance(tok, CharTokenizer):
        return _cut_anywhere
    return _cut_gpt2 if tok.encoder.pattern == GPT2_PATTERN else None


def _token_dtype(vocab_size):
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


# ---------------------------------------------------------------------------------------------------- sources

_HF_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _optional(module, what):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the optional package {module.split('.')[0]}: {_DATA_EXTRA}") from None


def _resolve_sources(sources, glob):
    """Each source as ('file', path), ('hf', load_dataset keyword arguments), in order; folders expanded."""
    resolved = []
    for source in sources:
        if isinstance(source, dict):
            if source.get("trust_remote_code"):
                raise ValueError("prepare_corpus does not run dataset scripts: leave out trust_remote_code and use "
                                 "a dataset stored as data files (Parquet, JSON, ...)")
            resolved.append(("hf", source))
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"a source is a path, a glob pattern, a dataset name or a dict of load_dataset "
                            f"arguments, got {type(source).__name__}")
        path = Path(source)
        if path.is_dir():
            files = sorted(f for f in path.glob(glob)
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                raise FileNotFoundError(f"the folder {path} has no files matching {glob!r}")
            resolved += [("file", f) for f in files]
        elif path.is_file():
            resolved.append(("file", path))
        elif globlib.has_magic(str(source)):
            files = sorted(Path(f) for f in globlib.glob(str(source), recursive=True) if os.path.isfile(f))
            if not files:
                raise FileNotFoundError(f"no files match {str(source)!r}")
            resolved += [("file", f) for f in files]
        elif _HF_NAME.fullmatch(str(source)) and not (path.suffix or str(source).startswith((".", "~"))
                                                       or Path(path.parts[0]).is_dir()):
            resolved.append(("hf", {"path": str(source)}))  # never a mistyped path: no suffix, no local folder
        else:
            raise FileNotFoundError(f"source {str(source)!r} is not a file or folder (a Hugging Face dataset is "
                                    f"named NAME or OWNER/NAME without a file suffix; pass other names as "
                                    f"{{'path': NAME}})")
    return resolved


def _describe(source):
    """A source for meta.json: a path or glob pattern made absolute, a dataset name or arguments as given."""
    if isinstance(source, dict):
        return source
    source = os.fspath(source)
    return os.path.abspath(source) if os.path.exists(source) or globlib.has_magic(source) else source


def _text_file(path):
    """A text file as one document, read in blocks: the text that open(path, encoding="utf-8").read() gives (line
    endings become \n, as in nanoGPT's prepare scripts and in the texts users compare with)."""
    with open(path, encoding="utf-8") as f:
        try:
            yield from iter(lambda: f.read(_PIECE_CHARS), "")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}); leave it out of the sources "
                             f"or pass a glob that does") from None


def _cut_text(path, val_fraction):
    """One text file as nanoGPT cuts tiny shakespeare: two documents, its first (1 - val_fraction) of characters
    (train) and the rest (val), each read in blocks as _text_file reads the whole."""
    total = sum(len(block) for block in _text_file(path))
    cut = int(total * (1 - val_fraction))

    def part(start, stop):
        seen = 0
        with closing(_text_file(path)) as blocks:  # the file closes when the part is read, not at garbage collection
            for block in blocks:
                if seen >= stop:
                    break
                lo, hi = max(start - seen, 0), min(stop - seen, len(block))
                if lo < hi:
                    yield block[lo:hi]
                seen += len(block)
    return [part(0, cut), part(cut, total)]


def _one_text(resolved):
    """Whether the sources are one text file (not .jsonl or .parquet), which is cut by characters."""
    return len(resolved) == 1 and resolved[0][0] == "file" and resolved[0][1].suffix not in (".jsonl", ".parquet")


def _jsonl_file(path, text_field):
    for lineno, row in jsonl_values(path, lambda n, msg: ValueError(f"{path}:{n} is not valid JSON: {msg}")):
        yield [_field(row, text_field, f"{path}:{lineno}")]


def _field(row, text_field, where):
    if not isinstance(row, dict) or text_field not in row:
        raise ValueError(f"{where} has no {text_field!r} field; name the text field with text_field=...")
    text = row[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text")
    return text


def _parquet_file(path, text_field):
    parquet = _optional("pyarrow.parquet", "reading Parquet files")
    table = parquet.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path} has no column {text_field!r} (it has {table.schema_arrow.names}); "
                         f"name the text column with text_field=...")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield [_field({text_field: text}, text_field, str(path))]


def _hf_dataset(spec, text_field):
    datasets = _optional("datasets", f"the Hugging Face dataset {spec.get('path')!r}")
    rows = datasets.load_dataset(**{"split": "train", **spec, "streaming": True})
    for row in rows:
        yield [_field(row, text_field, f"dataset {spec.get('path')!r}")]


def _documents(sources, text_field, cut=None):
    """Every document of every source, in order, each as an iterable of text blocks (with cut, the val_fraction
    of one text: its two parts, _cut_text)."""
    if cut is not None:
        yield from _cut_text(sources[0][1], cut)
        return
    for kind, source in sources:
        if kind == "hf":
            yield from _hf_dataset(source, text_field)
        elif source.suffix == ".jsonl":
            yield from _jsonl_file(source, text_field)
        elif source.suffix == ".parquet":
            yield from _parquet_file(source, text_field)
        else:
            yield _text_file(source)


def _pieces(blocks, cut, index):
    """Document `index`'s text as (piece, is_last) pairs of about _PIECE_CHARS characters (more where a pre-token is
    longer, up to _MAX_PIECE_CHARS), cut where `cut` says (never, if cut is None). An empty document gives nothing."""
    pending, text, searched = None, "", 0
    for block in blocks:
        text += block
        while cut and len(text) > _PIECE_CHARS:
            k = cut(text, searched)
            if k is None and len(text) < _MAX_PIECE_CHARS:
                searched = len(text)  # one pre-token so far: read on to its end
                break
            if k is None:  # memory stays bounded: such a pre-token is encoded in pieces
                k = _MAX_PIECE_CHARS
                warnings.warn(f"document {index} holds a pre-token (a run of letters, digits or symbols without a "
                              f"space) of over {_MAX_PIECE_CHARS:,} characters: it is encoded in pieces of "
                              f"{_MAX_PIECE_CHARS:,} characters, so its ids may differ from those of the whole run at "
                              f"each cut", stacklevel=2)
            if pending:
                yield pending, False
            pending, text, searched = text[:k], text[k:], 0
    if text:
        if pending:
            yield pending, False
        pending = text
    if pending:
        yield pending, True


def _work_units(documents, cut):
    """Lists of (document index, piece, is_last) holding about _UNIT_CHARS characters each."""
    unit, size = [], 0
    for index, blocks in enumerate(documents):
        for piece, last in _pieces(blocks, cut, index):
            unit.append((index, piece, last))
            size += len(piece)
            if size >= _UNIT_CHARS:
                yield unit
                unit, size = [], 0
    if unit:
        yield unit


# ---------------------------------------------------------------------------------------------------- encoding

def _in_val(index, seed, val_fraction):
    """Whether document `index` goes to the validation split: when blake2b(f"{seed}/{index}", 8-byte digest), read
    as a little-endian integer, is below val_fraction * 2**64. A pure function of (seed, index), so the split is the
    same whatever the order in which workers finish."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _encode_unit(state, unit):
    """A unit's pieces -> ([train tokens, val tokens] as arrays, [train documents, val documents], UTF-8 bytes);
    state: (tokenizer, seed, val_fraction), which each worker process holds (mygpt/workers.py)."""
    tokenizer, seed, val_fraction = state
    ids, documents, nbytes = ([], []), [0, 0], 0
    for index, piece, last in unit:
        # None: one text cut in two (_cut_text), document 0 trains and document 1 validates
        split = index if val_fraction is None else int(_in_val(index, seed, val_fraction))
        try:
            ids[split].extend(tokenizer.encode_ordinary(piece))
        except ValueError as e:
            raise ValueError(f"document {index}: {e}") from None
        if last:
            ids[split].append(tokenizer.eot_token)
            documents[split] += 1
        nbytes += len(piece.encode("utf-8"))
    return [np.array(x, dtype=_token_dtype(tokenizer.vocab_size)) for x in ids], documents, nbytes


@contextmanager
def _sigterm_raises():
    """Within: SIGTERM raises InterruptedError, so that prepare cleans up and says one line, as on Ctrl-C (left to
    the default, the process dies and each worker prints a BrokenPipeError traceback). A handler set by the caller,
    or a thread other than the main one, is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    main = os.getpid()

    def stop(signum, frame):
        if os.getpid() != main:  # a worker forked before it set its own handler (the pool ends as it starts)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # ends it quietly, as it ends the others
        raise InterruptedError("prepare was stopped by SIGTERM before the corpus was finished; run the same "
                               "prepare again to finish it")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _ShardWriter:
    """Appends one split's tokens to shards of `shard_tokens` tokens: {split}_000000.bin, {split}_000001.bin, ..."""

    def __init__(self, out_dir, split, shard_tokens, dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.shards, self.tokens, self.documents, self.file = 0, 0, 0, None

    def write(self, tokens):
        while len(tokens):
            if self.file is None:
                self.file = _ShardFile(self.out_dir / _shard_name(self.split, self.shards), self.dtype)
            take = min(len(tokens), self.shard_tokens - self.file.count)
            self.file.append(tokens[:take])
            self.tokens += take
            tokens = tokens[take:]
            if self.file.count == self.shard_tokens:
                self.close()

    def close(self):
        """Commit the shard being written, if any (the last one is usually shorter)."""
        if self.file is not None:
            self.file.commit()
            self.file, self.shards = None, self.shards + 1

    def discard(self):
        if self.file is not None:
            self.file.discard()
            self.file = None


def _shard_name(split, index):
    return f"{split}_{index:06d}.bin"


# ---------------------------------------------------------------------------------------------------- prepare

def _write_json(path, value):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _complete(out_dir, meta):
    """Whether every shard that meta.json lists is on disk, whole."""
    try:
        return all(sum(read_header(out_dir / _shard_name(split, i)).num_tokens for i in range(meta[split]["shards"]))
                   == meta[split]["tokens"] for split in _SPLITS)
    except (OSError, ShardError):
        return False


def _source_files(resolved):
    """What the source files are now, as make judges them: their count, total size and a sha256 of each one's path,
    size and modification time. Datasets from the hub are known by their arguments only (in the settings)."""
    digest, files, size = hashlib.sha256(), 0, 0
    for kind, source in resolved:
        if kind == "file":
            stat = source.stat()
            line = f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
            files, size = files + 1, size + stat.st_size
    return {"files": files, "bytes": size, "sha256": digest.hexdigest()}


def _claim(out_dir, settings, sources):
    """Make out_dir ours for these settings. Returns the meta of a finished run with the same settings and source
    files, else None (a finished corpus whose source files have changed since is prepared again).

    prepare.json records the settings of a run in progress, so that a rerun after an interruption knows the files
    it finds are its own; a folder holding another corpus, or shards nobody recorded, is refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, plan_path = out_dir / "meta.json", out_dir / "prepare.json"
    recorded = {}
    for path in (meta_path, plan_path):
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                recorded[path] = json.load(f)
            if not _same_settings(recorded[path].get("settings"), settings):
                raise ValueError(f"{out_dir} holds a corpus prepared with other settings ({path.name}); "
                                 f"choose another out_dir or delete that one")
    if meta_path in recorded and _complete(out_dir, recorded[meta_path]):
        before = recorded[meta_path].get("source_files")
        if before == sources:
            plan_path.unlink(missing_ok=True)
            return recorded[meta_path]
        was = f"{before['files']} files, {before['bytes']:,} bytes" if before else "not recorded"
        warnings.warn(f"the source files of {out_dir} have changed since it was prepared ({was}; now "
                      f"{sources['files']} files, {sources['bytes']:,} bytes): preparing it again", stacklevel=3)
    if not recorded and (any(out_dir.glob("train_*.bin")) or any(out_dir.glob("val_*.bin"))):
        raise ValueError(f"{out_dir} already holds shards that prepare_corpus did not record; choose an empty out_dir")
    if plan_path not in recorded:
        _write_json(plan_path, {"settings": settings})
    meta_path.unlink(missing_ok=True)  # meta.json marks a finished corpus; it comes back when this run ends
    for stale in [*out_dir.glob("*.bin.tmp-*"), *out_dir.glob("*.json.tmp-*")]:
        stale.unlink()  # left by a run of these settings that was killed
    return None


def _same_settings(recorded, settings):
    """Whether the settings that meta.json or prepare.json record are `settings`; an older file records the
    tokenizer in another form (mygpt.tokenizer), so the tokenizers compare by what they name."""
    if recorded == settings or not (isinstance(recorded, dict) and recorded.keys() == settings.keys()):
        return recorded == settings
    return ({**recorded, "tokenizer": None} == {**settings, "tokenizer": None}
            and same_tokenizer(recorded["tokenizer"], settings["tokenizer"]))


def _check_prepare_args(val_fraction, shard_tokens, num_workers, text_field):
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard_tokens must be an int in 1..{MAX_SHARD_TOKENS:,} (the header's int32 count), "
                         f"got {shard_tokens!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise ValueError(f"num_workers must be None (all CPU cores) or an int >= 1, got {num_workers!r}")
    if not isinstance(text_field, str):
        raise TypeError(f"text_field must be a str, got {type(text_field).__name__}")


_ONE_TEXT_VAL_FRACTION, _DOCUMENTS_VAL_FRACTION = 0.1, 0.005  # val_fraction=None: nanoGPT's 10% of one text


def prepare_corpus(sources, out_dir, tokenizer="gpt2", val_fraction=None, shard_tokens=100_000_000,
                   num_workers=None, text_field="text", seed=0, glob="**/*", progress=True):
    """Tokenise `sources` into train/val shards and meta.json in `out_dir`; returns the meta dict.

    sources: one or a list of: a text file (one document, line endings read as \n); a .jsonl file (one document per line, in `text_field`); a
    .parquet file (one per row, column `text_field`; needs pyarrow); a folder (every non-hidden file matching `glob`,
    recursively, in sorted order, each read by its suffix as above); a glob pattern; a Hugging Face dataset name or a
    dict of `datasets.load_dataset` arguments, e.g. {"path": "HuggingFaceFW/fineweb", "name": "sample-10BT"}
    (streamed, split "train" unless given; needs `mygpt[data]`).
    tokenizer: "gpt2", a mygpt `Encoder` (it must have <|endoftext|>), or a list of characters, which get ids
    0..len-1 and id len(chars) ends each document. Text is encoded as ordinary text (encode_ordinary); each non-empty
    document is followed by the end-of-text id; empty documents are skipped.
    Document i (counting every document read, empty ones too) goes to validation with probability val_fraction
    (None: 0.005), decided by a hash of (seed, i) (see _in_val), so that the split does not depend on the workers.
    One text file is cut as nanoGPT cuts tiny shakespeare instead: its first 1 - val_fraction (None: 0.9) of
    characters train and the rest validates, each part a document (ending with the end-of-text id).
    Sources without any text are an error.
    num_workers processes encode (None: all cores); the output is byte-identical for any number of them. Shards are
    written under temporary names and renamed when whole; after an interruption, run the same call again: it
    rewrites the corpus and ends byte-identical to an uninterrupted run (TokenDataset refuses the shards of an
    unfinished run). Rerunning a finished prepare returns at once, unless a source file was added, removed or
    changed (its size or modification time, recorded in meta.json): then it prepares the corpus again.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike, dict)) else list(sources)
    resolved = _resolve_sources(sources, glob)
    one_text = _one_text(resolved)
    if val_fraction is None:
        val_fraction = _ONE_TEXT_VAL_FRACTION if one_text else _DOCUMENTS_VAL_FRACTION
    _check_prepare_args(val_fraction, shard_tokens, num_workers, text_field)
    tok = _resolve_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    settings = json.loads(json.dumps({  # as JSON gives it back, so that a rerun compares equal
        "sources": [_describe(s) for s in sources], "glob": glob, "text_field": text_field, "tokenizer": tok.description,
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
        **({"split": "characters"} if one_text else {})}))
    sources = _source_files(resolved)  # before reading them: a file changed during the run counts as changed
    with exclusive(out_dir):  # one prepare at a time in a folder: a second is refused, naming the first
        finished = _claim(out_dir, settings, sources)
        if finished is not None:
            return finished

        workers = num_workers or os.cpu_count() or 1
        writers = {split: _ShardWriter(out_dir, split, shard_tokens, _token_dtype(tok.vocab_size)) for split in _SPLITS}
        units = _work_units(_documents(resolved, text_field, val_fraction if one_text else None), _cut_of(tok))
        nbytes = 0
        try:
            state = tok, seed, None if one_text else val_fraction
            with _sigterm_raises(), ordered_map(_encode_unit, state, workers, _UNFINISHED) as encoded, \
                    tqdm(desc="prepare", unit="B", unit_scale=True, unit_divisor=1000, disable=not progress) as bar:
                for tokens, documents, size in encoded(units):
                    for writer, part, docs in zip(writers.values(), tokens, documents):
                        writer.write(part)
                        writer.documents += docs
                    nbytes += size
                    bar.update(size)
                    bar.set_postfix_str(f"{writers['train'].tokens + writers['val'].tokens:,} tokens", refresh=False)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.discard()
            raise
        if not writers["train"].tokens + writers["val"].tokens:  # no shard was written: leave no trace
            (out_dir / "prepare.json").unlink()
            with suppress(OSError):
                out_dir.rmdir()  # when this prepare made it
            raise ValueError(f"{', '.join(map(str, settings['sources']))}: no text to prepare (empty files or "
                             f"documents); give sources that hold text")

        empty = [w.split for w in writers.values() if not w.documents]
        if empty and (val_fraction > 0 or empty == ["train"]):
            warnings.warn(f"no document went to the {' and '.join(empty)} split: the split is by document, and "
                          f"{writers['train'].documents + writers['val'].documents} documents were read; cut the text "
                          f"into more documents (files, or lines of a .jsonl) or change val_fraction", stacklevel=2)
        return _finish(out_dir, writers, tok, nbytes, settings, sources)


def _finish(out_dir, writers, tok, nbytes, settings, sources):
    """Remove shards numbered past this run's (left by an earlier run of changed sources), then write meta.json,
    which marks the corpus finished."""
    for writer in writers.values():
        for path in out_dir.glob(f"{writer.split}_*.bin"):
            number = re.fullmatch(rf"{writer.split}_(\d{{6}})\.bin", path.name)
            if number and int(number.group(1)) >= writer.shards:
                path.unlink()
    dtype = _token_dtype(tok.vocab_size)
    magic, version = _format_of(dtype)
    meta = {"vocab_size": tok.vocab_size, "eot": tok.eot_token, "dtype": dtype.name, "magic": magic,
            "version": version, "text_bytes": nbytes, "settings": settings, "source_files": sources}
    meta.update({w.split: {"shards": w.shards, "tokens": w.tokens, "documents": w.documents}
                 for w in writers.values()})
    _write_json(out_dir / "meta.json", meta)
    (out_dir / "prepare.json").unlink()
    return meta
