"""
Teach a GPT to add two n-digit numbers.

A problem a + b is the token sequence: the n digits of a, the n digits of b, then the n + 1 digits
of the sum written backwards. Backwards, because then the model emits the lowest digit first and
each digit depends only on digits it has already written (the carry flows from left to right).
For n = 2, 47 + 85 = 132 becomes 4 7 8 5 2 3 1.

Every problem is in exactly one of the train and test splits; the test accuracy counts the test
problems whose whole sum greedy generation gets right.

    python projects/adder/adder.py                     # about 30 s of one CPU thread
    python projects/adder/adder.py --data.ndigit=3 --trainer.max_iters=3000   # 100% of 10,000 test problems
"""

import os
import sys
import time

import torch
from torch.utils.data import Dataset

from mygpt import (GPT, CfgNode, Trainer, check_new_run, describe_tokenizer, exclusive, run_main, setup_logging,
                   setup_script, write_history)

# the dataset holds every one of the 10^(2n) problems as a token sequence: 3 digits is 10^6 problems (88 MB),
# 4 digits would be 10^8 (11 GB), so, as in minGPT, at most 3 digits
MAX_NDIGIT = 3
EXPECTED_DURATION = "about 30 s of one CPU thread (OMP_NUM_THREADS=1), 40 s with --data.ndigit=3"
TOKENIZER = describe_tokenizer(list("0123456789"))  # token i is the digit i, recorded in every checkpoint


def get_config():
    C = CfgNode()
    C.system = CfgNode(seed=3407, work_dir="./out/adder")
    C.data = AdditionDataset.get_default_config()
    C.model = GPT.get_default_config()
    C.model.n_layer, C.model.n_head, C.model.n_embd = 2, 4, 64
    # every problem is seen many times and the test asks for exact answers: dropout only slows learning
    C.model.embd_pdrop = C.model.resid_pdrop = C.model.attn_pdrop = 0.0
    C.trainer = Trainer.get_default_config()
    C.trainer.max_iters = 1500
    C.trainer.batch_size = 128
    C.trainer.learning_rate = 3e-3
    C.trainer.lr_decay = True
    C.trainer.warmup_tokens = 0
    C.trainer.ckpt_path = None     # None: checkpoint.pt in the work dir
    C.trainer.ckpt_interval = 500  # a killed run keeps its work: --trainer.resume=True continues it
    return C


class AdditionDataset(Dataset):
    """One split of all n-digit problems a + b, as (input, target) pairs with the prompt's targets masked to -1."""

    @staticmethod
    def get_default_config():
        return CfgNode(ndigit=2, test_fraction=0.2, max_test=10000)

    def __init__(self, config, split, seed=0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        num_test = check_data_config(config)
        n = config.ndigit
        num = 10 ** (2 * n)
        # the same seed gives both splits the same permutation, so they partition all problems
        order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
        self.problems = order[:num_test] if split == "test" else order[num_test:]
        self.ndigit = n
        self.sequences = encode(self.problems, n)

    def __len__(self):
        return len(self.problems)

    def __getitem__(self, i):
        seq = self.sequences[i]
        x, y = seq[:-1], seq[1:].clone()
        y[: 2 * self.ndigit - 1] = -1  # the operands are given, not predicted
        return x, y


def check_data_config(config):
    """The size of the test split; a clear error, naming the key, for a problem size the dataset cannot
    enumerate or a split that cannot exist."""
    n = config.ndigit
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NDIGIT:
        raise ValueError(f"--data.ndigit must be an int from 1 to {MAX_NDIGIT}, got {n!r}: the dataset enumerates "
                         f"all 10^(2 x ndigit) problems, and 4 digits would take 10^8 problems (11 GB)")
    if isinstance(config.test_fraction, bool) or not (isinstance(config.test_fraction, (int, float))
                                                      and 0 < config.test_fraction < 1):
        raise ValueError(f"--data.test_fraction must be a number strictly between 0 and 1, got {config.test_fraction!r}")
    if isinstance(config.max_test, bool) or not isinstance(config.max_test, int) or config.max_test < 1:
        raise ValueError(f"--data.max_test must be a positive int, got {config.max_test!r}")
    num = 10 ** (2 * n)
    num_test = min(int(num * config.test_fraction), config.max_test)
    if num_test < 1:
        raise ValueError(f"--data.test_fraction={config.test_fraction} of the {num} {n}-digit problems leaves "
                         f"no test problem; raise it")
    return num_test


def digits(values, count):
    """(N, count) decimal digits of values, most significant first."""
    powers = 10 ** torch.arange(count - 1, -1, -1)
    return values[:, None] // powers % 10


def encode(problems, n):
    """Token sequences (N, 3n + 1) for problem ids a * 10^n + b."""
    a, b = problems // 10 ** n, problems % 10 ** n
    return torch.cat([digits(a, n), digits(b, n), digits(a + b, n + 1).flip(1)], dim=1)


@torch.no_grad()
def count_correct(model, dataset, batch_size=2000):
    """How many problems of the dataset greedy generation solves exactly, in batches for speed."""
    n = dataset.ndigit
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(dataset), batch_size):
        seqs = dataset.sequences[start:start + batch_size].to(device)
        out = model.generate(seqs[:, :2 * n], n + 1, do_sample=False)
        correct += int((out[:, 2 * n:] == seqs[:, 2 * n:]).all(dim=1).sum())
    return correct


def main(args):
    train(setup_script(get_config(), args, __doc__))  # --model.preset=modern first


def train(config):
    train_dataset = AdditionDataset(config.data, "train", seed=config.system.seed)
    test_dataset = AdditionDataset(config.data, "test", seed=config.system.seed)
    config.model.vocab_size = len(TOKENIZER["chars"])
    config.model.block_size = 3 * config.data.ndigit
    model = GPT(config.model)
    config.trainer.ckpt_path = config.trainer.ckpt_path or os.path.join(config.system.work_dir, "checkpoint.pt")
    with exclusive(config.system.work_dir):  # one run at a time in a work dir, before anything is written
        check_new_run(config.trainer)  # before anything is written to the work dir
        log = setup_logging(config)  # once the config is complete, so the saved one can rebuild the run
        log.info(f"expected duration of the default run: {EXPECTED_DURATION}; torch threads "
                 f"here: {torch.get_num_threads()}")
        log.info(f"{len(train_dataset)} train and {len(test_dataset)} test problems, "
                 f"{model.num_parameters() / 1e6:.2f}M parameters")

        trainer = Trainer(config.trainer, model, train_dataset, tokenizer=TOKENIZER)
        started = time.time()
        trainer.run()
        write_history(trainer, config.system.work_dir)  # history.csv, and loss.png with matplotlib
        if trainer.interrupted:  # Ctrl-C or SIGTERM: the checkpoint is saved; leave the grace time unused
            log.info("continue this run with --trainer.resume=True")
            return
        log.info(f"trained to iteration {trainer.iter_num} in {time.time() - started:.0f}s, final train loss {trainer.loss:.4f}")

        correct = count_correct(model, test_dataset)
        log.info(f"test accuracy: {correct}/{len(test_dataset)} = {100 * correct / len(test_dataset):.2f}%")


if __name__ == "__main__":
    sys.exit(run_main(main))  # the library's errors as one line, `NAME: error: ...`, as the mygpt command prints them
