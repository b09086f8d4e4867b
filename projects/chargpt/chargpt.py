"""
A character-level language model on any UTF-8 text file.

Train (without --data.input_file it fetches tiny shakespeare):

    python projects/chargpt/chargpt.py --data.input_file=book.txt

Sample from the best checkpoint of a run:

    python projects/chargpt/chargpt.py --system.mode=sample --sample.prompt="ROMEO:" --sample.length=500

The defaults are nanoGPT's CPU configuration of its shakespeare_char run (about 2.5 minutes of one CPU thread).
"""

import json
import os
import sys

import torch
from torch.utils.data import Dataset

from mygpt import (GPT, CfgNode, DownloadError, Trainer, atomic_path, check_new_run, check_sampling_args,
                   describe_tokenizer, document_start, exclusive, load_checkpoint, load_tokenizer, open_checkpoint,
                   run_main, setup_logging, setup_script, tiny_shakespeare, write_history)

EXPECTED_DURATION = "about 2.5 minutes of one CPU thread (OMP_NUM_THREADS=1) for tiny shakespeare"


def get_config():
    C = CfgNode()
    C.system = CfgNode(seed=3407, work_dir="./out/chargpt", mode="train")  # mode: 'train' or 'sample'
    C.data = CfgNode(input_file=None, block_size=64, val_fraction=0.1)
    C.model = GPT.get_default_config()
    C.model.n_layer, C.model.n_head, C.model.n_embd = 4, 4, 128
    C.model.embd_pdrop = C.model.resid_pdrop = C.model.attn_pdrop = 0.0
    C.trainer = Trainer.get_default_config()
    C.trainer.max_iters = 2000
    C.trainer.batch_size = 12
    C.trainer.learning_rate = 1e-3
    C.trainer.lr_decay = True
    C.trainer.lr_schedule = "nanogpt"  # nanoGPT's recipe, its cosine (the library's default is the seed's)
    C.trainer.eval_interval = 250
    C.trainer.ckpt_path = None      # None: checkpoint.pt in the work dir
    C.trainer.ckpt_interval = 250   # a killed run keeps its work: --trainer.resume=True continues it
    # prompt "": a new document, as `mygpt sample` starts one: at a newline (else the first character)
    C.sample = CfgNode(prompt="", length=500, temperature=1.0, top_k=None, every_eval=200)
    return C


class CharDataset(Dataset):
    """Every window of block_size + 1 characters of a text, as (input, next-character target) pairs."""

    def __init__(self, text, tokenizer, block_size):
        self.data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        self.block_size = block_size

    def __len__(self):
        return max(0, len(self.data) - self.block_size)

    def __getitem__(self, i):
        chunk = self.data[i:i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def read_text(path):
    """The training text and where it came from: the given file, else tiny shakespeare from the download cache.

    Any non-empty UTF-8 text will do; an empty or binary file is refused.
    """
    if path is None:
        try:
            path = tiny_shakespeare()
        except DownloadError as err:
            raise DownloadError(f"{err}; or train on any UTF-8 text file you have: "
                                f"--data.input_file=path/to/file.txt") from None
    path = str(path)  # --data.input_file=2024 names a file, not file descriptor 2024
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"--data.input_file {path} {what}; give a UTF-8 text file")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"--data.input_file {path} is empty; give a UTF-8 text file")
    if b"\0" in data:
        raise ValueError(f"--data.input_file {path} holds NUL bytes: it is a binary file, not text; give a UTF-8 text file")
    try:
        return data.decode("utf-8"), path
    except UnicodeDecodeError as err:
        raise ValueError(f"--data.input_file {path} is not UTF-8 text (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); convert it to UTF-8 or give another file") from None


def split_point(n, val_fraction):
    """Where a text of n characters splits: the first part trains, the rest validates."""
    return int(n * (1 - val_fraction))


def min_text_length(block_size, val_fraction):
    """The fewest characters whose split leaves one window (block_size + 1 characters) in each part that
    is used; both parts grow with the text, so a binary search finds it."""
    def fits(n):
        cut = split_point(n, val_fraction)
        return cut > block_size and (val_fraction == 0 or n - cut > block_size)

    lo = hi = block_size + 1
    while not fits(hi):
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def check_data_config(data):
    """Refuse, naming the key, a split or window size that cannot be (before any file is read)."""
    vf, block_size = data.val_fraction, data.block_size
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
        raise ValueError(f"--data.val_fraction must be a number in [0, 1) (0: no validation), got {vf!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"--data.block_size must be a positive int, got {block_size!r}")


def split_text(text, data, path):
    """The train and val parts of the text (val is None when val_fraction is 0)."""
    vf, block_size = data.val_fraction, data.block_size
    needed = min_text_length(block_size, vf)
    if len(text) < needed:
        parts = "each of its train and val parts" if vf else "it"
        raise ValueError(f"{path} holds {len(text)} characters; with block_size={block_size} and val_fraction={vf} "
                         f"it needs at least {needed}, so that {parts} holds one window of block_size + 1 "
                         f"characters. Give a longer text, or lower --data.block_size or --data.val_fraction")
    cut = split_point(len(text), vf)
    return text[:cut], (text[cut:] if vf else None)


def sampling_prompt(prompt, tokenizer, note):
    """The prompt samples continue. The default, "", starts a new document as `mygpt sample` does (a newline,
    else the vocabulary's first character, with a note); a prompt the user gave must use the text's characters."""
    if not isinstance(prompt, str):
        raise ValueError(f"--sample.prompt must be a string, got {prompt!r}")
    if not prompt:
        return document_start(tokenizer, note)[1]
    unknown = sorted(set(prompt) - set(tokenizer.chars))
    if unknown:
        raise ValueError(f"--sample.prompt holds characters the model never saw in training: {unknown!r}; "
                         f"use characters of its text")
    return prompt


def check_sample_config(S):
    """Refuse bad sampling options now rather than at the first evaluation, minutes into a run."""
    if isinstance(S.every_eval, bool) or not isinstance(S.every_eval, int) or S.every_eval < 0:
        raise ValueError(f"--sample.every_eval must be an int >= 0, got {S.every_eval!r}")
    try:
        check_sampling_args(S.length, S.temperature, True, S.top_k, None, None)  # what generate will check
    except ValueError as err:
        raise ValueError(f"--sample.*: {err}") from None


def sample(model, tokenizer, prompt, length, temperature=1.0, top_k=None):
    """The prompt followed by `length` sampled characters."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    out = model.generate(idx, length, temperature=temperature, do_sample=True, top_k=top_k)
    return tokenizer.decode(out[0].tolist())


def run_tokenizer(description, work_dir):
    """The characters of a run: the tokenizer its checkpoint records (description), else the work dir's vocab.json
    (runs from before checkpoints recorded it)."""
    if description is None:
        with open(os.path.join(work_dir, "vocab.json"), encoding="utf-8") as f:
            description = describe_tokenizer(json.load(f))
    return load_tokenizer(description)


def check_rerun(config, best_path, chars):
    """Stop before anything is written when the work dir holds a run that this one would replace unasked,
    or would resume on another text's characters."""
    C = config.trainer
    check_new_run(C, best_path)
    if not (C.resume and os.path.exists(C.ckpt_path)):
        return
    if run_tokenizer(load_checkpoint(C.ckpt_path).get("tokenizer"), config.system.work_dir).chars != chars:
        raise ValueError(f"{C.ckpt_path} was trained on a text with other characters than "
                         f"{config.data.input_file}; resume it on the same text")


def train(config):
    check_data_config(config.data)
    check_sample_config(config.sample)
    text, path = read_text(config.data.input_file)
    train_text, val_text = split_text(text, config.data, path)
    chars = sorted(set(text))
    tokenizer = load_tokenizer(describe_tokenizer(chars))
    work_dir = config.system.work_dir
    C = config.trainer
    C.ckpt_path = C.ckpt_path or os.path.join(work_dir, "checkpoint.pt")
    best_path = os.path.join(work_dir, "best.pt")
    with exclusive(work_dir):  # one run at a time in a work dir, before anything is written
        check_rerun(config, best_path, chars)

        config.model.vocab_size = len(chars)
        config.model.block_size = config.data.block_size
        log = setup_logging(config)
        prompt = sampling_prompt(config.sample.prompt, tokenizer, log.info)  # now, not at the first evaluation
        with atomic_path(os.path.join(work_dir, "vocab.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(chars, f)
        if C.overwrite and os.path.exists(best_path):
            os.remove(best_path)  # the replaced run's best checkpoint must not pass for this run's
            log.info(f"overwrite=True: removed {best_path} of the earlier run")

        model = GPT(config.model)
        log.info(f"expected duration of the default run: {EXPECTED_DURATION}; torch threads "
                 f"here: {torch.get_num_threads()}")
        log.info(f"{path}: {len(text)} characters, {len(chars)} distinct; {model.num_parameters() / 1e6:.2f}M parameters"
                 + ("; val_fraction=0: no validation, no best.pt" if val_text is None else ""))
        val_dataset = None if val_text is None else CharDataset(val_text, tokenizer, config.data.block_size)
        trainer = Trainer(C, model, CharDataset(train_text, tokenizer, config.data.block_size), val_dataset,
                          tokenizer=describe_tokenizer(tokenizer))
        if val_dataset is not None:
            trainer.add_callback("on_eval_end", keep_best(config, best_path, tokenizer, prompt, log))
        trainer.run()
        write_history(trainer, work_dir)  # history.csv, and loss.png with matplotlib
        if trainer.interrupted:  # Ctrl-C or SIGTERM: the checkpoint is saved; leave the grace time unused
            log.info("continue this run with --trainer.resume=True")
            return

        recent = [h["loss"] for h in trainer.history[-100:]]
        if recent:
            last_val = trainer.history[-1].get("val_loss")  # the Trainer evaluates at the last step too
            val = "" if last_val is None else f", val loss {last_val:.4f}"
            log.info(f"iter {trainer.iter_num}: train loss (mean of the last {len(recent)} steps) "
                     f"{sum(recent) / len(recent):.4f}{val}")


def keep_best(config, best_path, tokenizer, prompt, log):
    """An on_eval_end callback: save best.pt when the val loss improves, log a sample."""
    S = config.sample

    def on_eval_end(trainer):
        loss = trainer.history[-1]["val_loss"]
        # the history survives a resume, so the best loss so far does too
        earlier = [h["val_loss"] for h in trainer.history[:-1] if "val_loss" in h]
        if not earlier or loss < min(earlier):
            trainer.save_checkpoint(best_path)
            log.info(f"iter {trainer.iter_num}: best val loss so far, saved {best_path}")
        if S.every_eval:
            log.info(sample(trainer.model, tokenizer, prompt, S.every_eval, S.temperature, S.top_k))
    return on_eval_end


def sample_from_checkpoint(config):
    """Print config.sample.length characters continuing config.sample.prompt, from the run's best checkpoint."""
    work_dir = config.system.work_dir
    if not os.path.isdir(work_dir):
        raise FileNotFoundError(f"{work_dir} is not a run's work dir: train first, or point --system.work_dir at one")
    # its best.pt, else checkpoint.pt (a run without validation, or too short to have evaluated)
    model, _, ckpt = open_checkpoint(work_dir)
    tokenizer = run_tokenizer(ckpt.get("tokenizer"), work_dir)
    S = config.sample
    check_sample_config(S)
    prompt = sampling_prompt(S.prompt, tokenizer, lambda text: print(text, file=sys.stderr))
    print(sample(model, tokenizer, prompt, S.length, S.temperature, S.top_k))


def main(args):
    config = setup_script(get_config(), args, __doc__, modes=("train", "sample"))  # --model.preset=modern first
    if config.system.mode == "sample":
        return sample_from_checkpoint(config)
    train(config)


if __name__ == "__main__":
    sys.exit(run_main(main))  # the library's errors as one line, `NAME: error: ...`, as the mygpt command prints them
