"""What the Trainer costs over a bare training loop, and how long a checkpoint takes to write.

    flock /tmp/mygpt-bench.lock python bench/bench_trainer.py [--rounds=6] [--steps=4] [--device=auto]

One Trainer.run() at the seed configuration (3 layers, 8 heads, 512 wide, block 128, vocab 65, batch 16);
every --steps steps a callback pauses it and runs the same number of steps of a hand-written loop (same
architecture and initial weights, same kind of data loader, same optimizer and clipping). The two are
timed in alternation, so load from elsewhere on the machine falls on both alike. The first round of
each is warm-up and is not counted.
"""

import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

from mygpt import GPT, Trainer, resolve_device

BLOCK, VOCAB, BATCH = 128, 65, 16


class RandomText(Dataset):
    """Windows of a fixed random token stream, like a character dataset of 200k characters."""

    def __init__(self, length=200_000):
        self.data = torch.randint(VOCAB, (length,), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data) - BLOCK

    def __getitem__(self, i):
        chunk = self.data[i:i + BLOCK + 1]
        return chunk[:-1], chunk[1:]


def seed_model():
    C = GPT.get_default_config()
    C.n_layer, C.n_head, C.n_embd, C.vocab_size, C.block_size = 3, 8, 512, VOCAB, BLOCK
    torch.manual_seed(0)
    return GPT(C)


class BareLoop:
    """The loop one writes by hand: zero_grad, forward, backward, clip, step."""

    def __init__(self, model, dataset, train_config, device):
        self.model = model.to(device)
        self.device = device
        self.optimizer = model.configure_optimizers(train_config)
        self.batches = self._forever(DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True))

    @staticmethod
    def _forever(loader):
        while True:
            yield from loader

    def steps(self, n):
        start = time.perf_counter()
        for _ in range(n):
            x, y = next(self.batches)
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            loss.item()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main(rounds=6, steps=4, device="auto"):
    device = resolve_device(device)
    dataset = RandomText()
    model = seed_model()
    C = Trainer.get_default_config()
    C.device, C.batch_size, C.learning_rate, C.quiet, C.log_interval = device, BATCH, 6e-4, True, 0
    C.max_iters = (rounds + 1) * steps
    C.precision = "fp32"  # as the bare loop computes ('auto', the default, may take bf16)
    bare = BareLoop(copy.deepcopy(model), dataset, C, device)
    trainer = Trainer(C, model, dataset)

    trainer_times, bare_times, mark = [], [], [None]

    def interleave(t):
        if t.iter_num % steps:
            return
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if mark[0] is not None:
            trainer_times.append(time.perf_counter() - mark[0])
        bare_times.append(bare.steps(steps))
        mark[0] = time.perf_counter()

    trainer.add_callback("on_batch_end", interleave)
    trainer.run()
    tokens = steps * BATCH * BLOCK
    trainer_rate = [tokens / t for t in trainer_times]
    bare_rate = [tokens / t for t in bare_times[1:]]
    ratio = sum(bare_times[1:]) / sum(trainer_times)
    print(f"device {device}, {torch.get_num_threads()} threads, {trainer.model.num_parameters():,} parameters, "
          f"{rounds} rounds of {steps} steps of {BATCH}x{BLOCK} tokens")
    print(f"bare loop  {statistics.median(bare_rate):9.0f} tokens/s (median of rounds)")
    print(f"Trainer    {statistics.median(trainer_rate):9.0f} tokens/s (median of rounds)")
    print(f"Trainer / bare throughput: {ratio:.3f} (overhead {100 * (1 - ratio):+.1f}%)")
    print("per-round ratios:", " ".join(f"{b / t:.3f}" for b, t in zip(bare_times[1:], trainer_times)))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        times = []
        for _ in range(3):
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            times.append(time.perf_counter() - start)
        size = os.path.getsize(path) / 2 ** 20
    print(f"checkpoint: {size:.1f} MiB (weights, AdamW moments, RNG, history) written in "
          f"{statistics.median(times):.3f} s (median of 3, with fsync)")


if __name__ == "__main__":
    options = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])
    main(rounds=int(options.get("rounds", 6)), steps=int(options.get("steps", 4)),
         device=options.get("device", "auto"))
