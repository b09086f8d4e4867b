"""torch.compile (inductor, built with the machine's C compiler) against eager mode on the CPU, fp32 and bf16 autocast.

    OMP_NUM_THREADS=1 python bench/bench_compile.py [--only=train|decode] [--shapes=chargpt,6x384,seed,gpt2]
                                                    [--rounds=3]

Training, steps/s of Trainer.run (AdamW, random tokens of a 65-character vocabulary):
    chargpt   4 x 128, block 64, batch 12, no dropout   nanoGPT's CPU recipe for shakespeare_char (projects/chargpt)
    6x384     6 x 384, block 256, batch 8, no dropout   nanoGPT's shakespeare_char GPU shape ...
    6x384d    the same with dropout 0.2                 ... with its dropout
Cached decoding, tokens/s of model.generate (greedy, batch 1, a one-token prompt, random weights):
    seed      3 x 512 (8 heads), vocab 65, block 256: the seed's shape, 200 new tokens
    gpt2      GPT-2 124M's shape (12 x 768, vocab 50257, block 1024), 64 new tokens

Each shape and precision runs in a process of its own, with an empty inductor cache (a first compile, as a user
meets it), holding an eager and a compiled copy of the same model, measured in alternating rounds so that load
from elsewhere falls on both alike; the median round is reported. The compile time (the first compiled step,
or the first compiled generation, less an eager one) is reported apart and kept out of the rates. bf16 is
torch.autocast: precision='bf16' in the Trainer, an autocast context around generate.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mygpt import GPT, Trainer  # noqa: E402
from machine import cpu_description  # noqa: E402

TRAIN_SHAPES = {  # name: (n_layer, n_head, n_embd, block_size, batch_size, dropout, steps per round)
    "chargpt": (4, 4, 128, 64, 12, 0.0, 60),
    "6x384": (6, 6, 384, 256, 8, 0.0, 6),
    "6x384d": (6, 6, 384, 256, 8, 0.2, 6),
}
DECODE_SHAPES = {  # name: (n_layer, n_head, n_embd, vocab_size, block_size, new tokens per round)
    "seed": (3, 8, 512, 65, 256, 200),
    "gpt2": (12, 12, 768, 50257, 1024, 64),
}
VOCAB = 65
FAILED = "torch.compile could not compile"  # the start of the one line a failed compile prints


class Messages(logging.Handler):
    """What the library says on its 'mygpt' logger (the Trainer's lines too, once a handler is set)."""

    def __init__(self):
        super().__init__()
        self.lines = []
        logger = logging.getLogger("mygpt")
        logger.setLevel(logging.INFO)  # the Trainer says what it says at INFO
        logger.addHandler(self)

    def emit(self, record):
        self.lines.append(record.getMessage())

    def failure(self):
        """The warning of a failed compile, or None."""
        return next((line for line in self.lines if FAILED in line), None)


def model_config(n_layer, n_head, n_embd, vocab_size, block_size, dropout=0.0):
    c = GPT.get_default_config()
    c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size = n_layer, n_head, n_embd, vocab_size, block_size
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = dropout
    return c


class RandomWindows(torch.utils.data.Dataset):
    """(x, y) windows of a fixed random token sequence: the speed of a step does not depend on the text."""

    def __init__(self, block_size, n=4096):
        self.data = torch.randint(0, VOCAB, (n + block_size + 1,), generator=torch.Generator().manual_seed(0))
        self.block_size, self.n = block_size, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        chunk = self.data[i:i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def timed_steps(trainer, steps):
    """Seconds per step over `steps` more steps of trainer (the first of them, which starts the loader, left out)."""
    stamps = []
    trainer.set_callback("on_batch_end", lambda t: stamps.append(time.perf_counter()))
    trainer.config.max_iters = trainer.iter_num + steps + 1
    trainer.run()
    return (stamps[-1] - stamps[0]) / steps


def bench_train(name, precision, rounds):
    n_layer, n_head, n_embd, block_size, batch_size, dropout, steps = TRAIN_SHAPES[name]
    trainers = {}
    for compile in (False, True):
        torch.manual_seed(0)
        C = Trainer.get_default_config()
        C.merge_from_dict(dict(device="cpu", batch_size=batch_size, learning_rate=1e-3, quiet=True, log_interval=0,
                               precision=precision, compile=compile))
        model = GPT(model_config(n_layer, n_head, n_embd, VOCAB, block_size, dropout))
        trainers[compile] = Trainer(C, model, RandomWindows(block_size))
    eager_first = timed_first_step(trainers[False])
    messages = Messages()
    compile_s = timed_first_step(trainers[True]) - eager_first
    failure = messages.failure()
    times = {False: [], True: []}
    for _ in range(rounds):
        for compile, trainer in trainers.items():
            times[compile].append(timed_steps(trainer, steps))
    rates = {k: 1 / statistics.median(v) for k, v in times.items()}
    return dict(eager=rates[False], compiled=rates[True], compile_s=compile_s, failure=failure, unit="steps/s")


def timed_first_step(trainer):
    """Seconds of a trainer's first step: for a compiled model, the compile and the step."""
    trainer.config.max_iters = trainer.iter_num + 1
    start = time.perf_counter()
    trainer.run()
    return time.perf_counter() - start


def bench_decode(name, precision, rounds):
    n_layer, n_head, n_embd, vocab_size, block_size, tokens = DECODE_SHAPES[name]
    torch.manual_seed(0)
    model = GPT(model_config(n_layer, n_head, n_embd, vocab_size, block_size)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def generate(compile):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            start = time.perf_counter()
            out = model.generate(prompt, tokens, compile=compile)
            return time.perf_counter() - start, out

    eager_s, eager_out = generate(False)
    messages = Messages()
    compiled_s, compiled_out = generate(True)
    times = {False: [], True: []}
    for _ in range(rounds):
        for compile in times:
            times[compile].append(generate(compile)[0])
    rates = {k: tokens / statistics.median(v) for k, v in times.items()}
    return dict(eager=rates[False], compiled=rates[True], compile_s=compiled_s - eager_s,
                failure=messages.failure(), same_tokens=torch.equal(eager_out, compiled_out),
                unit="tokens/s")


def child(args):
    """One shape and precision, in this process: print its figures as one JSON line."""
    load = os.getloadavg()[0]
    bench = bench_train if args.child_kind == "train" else bench_decode
    result = bench(args.child_shape, args.child_precision, args.rounds)
    print(json.dumps(dict(result, load=(load, os.getloadavg()[0]))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("train", "decode"))
    parser.add_argument("--shapes", default=",".join([*TRAIN_SHAPES, *DECODE_SHAPES]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child-kind", help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_kind:
        return child(args)
    shapes = args.shapes.split(",")
    print(f"torch {torch.__version__}, {cpu_description()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load {os.getloadavg()[0]:.2f} at the start; median of {args.rounds} alternating rounds")
    print(f"{'':<8}{'shape':<9}{'precision':<11}{'eager':>10}{'compiled':>10}{'ratio':>8}{'compile s':>11}"
          f"{'load':>11}  notes")
    for kind, table in (("train", TRAIN_SHAPES), ("decode", DECODE_SHAPES)):
        if args.only not in (None, kind):
            continue
        for shape in (s for s in table if s in shapes):
            for precision in ("fp32", "bf16"):
                with tempfile.TemporaryDirectory() as cache:  # a first compile: nothing from an earlier run
                    run = subprocess.run([sys.executable, __file__, f"--rounds={args.rounds}", f"--child-kind={kind}",
                                          f"--child-shape={shape}", f"--child-precision={precision}"],
                                         capture_output=True, text=True, env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache))
                if run.returncode != 0:
                    print(f"{kind:<8}{shape:<9}{precision:<11}failed:\n{run.stderr[-2000:]}")
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                notes = [r["unit"]]
                if r.get("same_tokens") is not None:
                    notes.append("same tokens" if r["same_tokens"] else "tokens differ")
                if r["failure"]:
                    notes.append(f"compile failed: {r['failure']}")
                load = "{:.1f}-{:.1f}".format(*r["load"])
                print(f"{kind:<8}{shape:<9}{precision:<11}{r['eager']:>10.2f}{r['compiled']:>10.2f}"
                      f"{r['compiled'] / r['eager']:>7.2f}x{r['compile_s']:>11.1f}{load:>11}  {', '.join(notes)}",
                      flush=True)


if __name__ == "__main__":
    main()
