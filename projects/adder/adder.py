"""
Teach a GPT to add two n-digit numbers.

A problem a + b is the token sequence: the n digits of a, the n digits of b, then the n + 1 digits
of the sum written backwards. Backwards, because then the model emits the lowest digit first and
each digit depends only on digits it has already written (the carry flows from left to right).
For n = 2, 47 + 85 = 132 becomes 4 7 8 5 2 3 1.

Every problem is in exactly one of the train and test splits; the test accuracy counts the test
problems whose whole sum greedy generation gets right.

    python projects/adder/adder.py
    python projects/adder/adder.py --data.ndigit=3 --trainer.max_iters=20000
"""

import os
import sys
import time

import torch
from torch.utils.data import Dataset

from mygpt import GPT, CfgNode, Trainer, set_seed, setup_logging


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
    return C


class AdditionDataset(Dataset):
    """One split of all n-digit problems a + b, as (input, target) pairs with the prompt's targets masked to -1."""

    @staticmethod
    def get_default_config():
        return CfgNode(ndigit=2, test_fraction=0.2, max_test=10000)

    def __init__(self, config, split, seed=0):
        n = config.ndigit
        num = 10 ** (2 * n)
        num_test = min(int(num * config.test_fraction), config.max_test)
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
    config = get_config()
    config.merge_from_args(args)
    set_seed(config.system.seed)

    train_dataset = AdditionDataset(config.data, "train", seed=config.system.seed)
    test_dataset = AdditionDataset(config.data, "test", seed=config.system.seed)
    config.model.vocab_size = 10
    config.model.block_size = 3 * config.data.ndigit
    model = GPT(config.model)
    config.trainer.ckpt_path = config.trainer.ckpt_path or os.path.join(config.system.work_dir, "checkpoint.pt")
    log = setup_logging(config)  # once the config is complete, so the saved one can rebuild the run
    log.info(f"{len(train_dataset)} train and {len(test_dataset)} test problems, "
             f"{model.num_parameters() / 1e6:.2f}M parameters")

    trainer = Trainer(config.trainer, model, train_dataset)
    started = time.time()
    trainer.run()
    trainer.save_history(os.path.join(config.system.work_dir, "history.csv"))
    log.info(f"trained to iteration {trainer.iter_num} in {time.time() - started:.0f}s, final train loss {trainer.loss:.4f}")

    correct = count_correct(model, test_dataset)
    log.info(f"test accuracy: {correct}/{len(test_dataset)} = {100 * correct / len(test_dataset):.2f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
