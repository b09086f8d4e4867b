"""
A character-level language model on any UTF-8 text file.

Train (without --data.input_file it fetches tiny shakespeare):

    python projects/chargpt/chargpt.py --data.input_file=book.txt

Sample from the best checkpoint of a run:

    python projects/chargpt/chargpt.py --system.mode=sample --sample.prompt="ROMEO:" --sample.length=500

The defaults are nanoGPT's CPU configuration of its shakespeare_char run (a few minutes on a laptop).
"""

import json
import os
import sys

import torch
from torch.utils.data import Dataset

from mygpt import GPT, CfgNode, DownloadError, Trainer, download, set_seed, setup_logging

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


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
    C.trainer.eval_interval = 250
    C.trainer.ckpt_path = None      # None: checkpoint.pt in the work dir
    C.sample = CfgNode(prompt="\n", length=500, temperature=1.0, top_k=None, every_eval=200)
    return C


class CharDataset(Dataset):
    """Every window of block_size + 1 characters of a text, as (input, next-character target) pairs."""

    def __init__(self, text, chars, block_size):
        stoi = {c: i for i, c in enumerate(chars)}
        self.data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        self.block_size = block_size

    def __len__(self):
        return len(self.data) - self.block_size

    def __getitem__(self, i):
        chunk = self.data[i:i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def read_text(path):
    """The training text and where it came from: the given file, else tiny shakespeare from the download cache."""
    if path is None:
        try:
            path = download(TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_SHA256, filename="tinyshakespeare.txt")
        except DownloadError as err:
            sys.exit(f"{err}\nOr train on any UTF-8 text file you have: --data.input_file=path/to/file.txt")
    with open(path, encoding="utf-8") as f:
        return f.read(), path


def encode(text, chars):
    unknown = sorted(set(text) - set(chars))
    if unknown:
        raise ValueError(f"characters {unknown!r} are not in the model's vocabulary")
    stoi = {c: i for i, c in enumerate(chars)}
    return torch.tensor([[stoi[c] for c in text]], dtype=torch.long)


def sample(model, chars, prompt, length, temperature=1.0, top_k=None):
    """The prompt followed by `length` sampled characters."""
    device = next(model.parameters()).device
    out = model.generate(encode(prompt, chars).to(device), length, temperature=temperature,
                         do_sample=True, top_k=top_k)
    return "".join(chars[i] for i in out[0].tolist())


def train(config):
    text, path = read_text(config.data.input_file)
    chars = sorted(set(text))
    split = int(len(text) * (1 - config.data.val_fraction))
    train_dataset = CharDataset(text[:split], chars, config.data.block_size)
    val_dataset = CharDataset(text[split:], chars, config.data.block_size)

    config.model.vocab_size = len(chars)
    config.model.block_size = config.data.block_size
    C = config.trainer
    C.ckpt_path = C.ckpt_path or os.path.join(config.system.work_dir, "checkpoint.pt")
    log = setup_logging(config)
    with open(os.path.join(config.system.work_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(chars, f)

    model = GPT(config.model)
    log.info(f"{path}: {len(text)} characters, {len(chars)} distinct; {model.num_parameters() / 1e6:.2f}M parameters")
    trainer = Trainer(C, model, train_dataset, val_dataset)
    trainer.add_callback("on_eval_end", keep_best(config, chars, log))
    trainer.run()
    trainer.save_history(os.path.join(config.system.work_dir, "history.csv"))

    recent = [h["loss"] for h in trainer.history[-100:]]
    log.info(f"iter {trainer.iter_num}: train loss (mean of the last {len(recent)} steps) "
             f"{sum(recent) / len(recent):.4f}, val loss {trainer.evaluate():.4f}")


def keep_best(config, chars, log):
    """An on_eval_end callback: log the val loss and a sample, save best.pt when the val loss improves."""
    best_path = os.path.join(config.system.work_dir, "best.pt")
    S = config.sample

    def on_eval_end(trainer):
        loss = trainer.history[-1]["val_loss"]
        # the history survives a resume, so the best loss so far does too
        earlier = [h["val_loss"] for h in trainer.history[:-1] if "val_loss" in h]
        is_best = not earlier or loss < min(earlier)
        if is_best:
            trainer.save_checkpoint(best_path)
        log.info(f"iter {trainer.iter_num}: val loss {loss:.4f}{' (best so far, saved)' if is_best else ''}")
        if S.every_eval:
            log.info(sample(trainer.model, chars, S.prompt, S.every_eval, S.temperature, S.top_k))
    return on_eval_end


def sample_from_checkpoint(config):
    """Print config.sample.length characters continuing config.sample.prompt, from the run's best checkpoint."""
    work_dir = config.system.work_dir
    path = os.path.join(work_dir, "best.pt")
    if not os.path.exists(path):
        path = os.path.join(work_dir, "checkpoint.pt")  # a run too short to have evaluated
    model = GPT.from_checkpoint(path)
    with open(os.path.join(work_dir, "vocab.json"), encoding="utf-8") as f:
        chars = json.load(f)
    S = config.sample
    print(sample(model, chars, S.prompt, S.length, S.temperature, S.top_k))


def main(args):
    config = get_config()
    config.merge_from_args(args)
    set_seed(config.system.seed)
    if config.system.mode == "train":
        train(config)
    elif config.system.mode == "sample":
        sample_from_checkpoint(config)
    else:
        raise ValueError(f"--system.mode must be 'train' or 'sample', got {config.system.mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
