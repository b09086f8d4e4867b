"""fp32 against precision='auto' in training: the same runs from the same seeds, side by side.

    python bench/bench_precision.py [--seeds=3] [--shapes=chargpt,6x384] [--steps=2000,150] [--text=FILE]
    python bench/bench_precision.py steps [--shapes=chargpt,6x384] [--steps=30,3] [--rounds=3]
                                          [--runs=default,modern,modern_tw]

Each shape is projects/chargpt's race (bench/bench_modern.py's `run`: nanoGPT's CPU recipe, AdamW 1e-3, its
cosine, no dropout) at one of two sizes:

    chargpt   4 layers, 4 heads, 128 wide, block 64, batch 12   (nanoGPT's CPU recipe for shakespeare_char)
    6x384     6 layers, 6 heads, 384 wide, block 256, batch 8   (nanoGPT's GPU recipe's shape, fewer steps)

For every seed (the model's initialisation and the data order), the fp32 run and the auto run start at the
same moment, one process each on one thread (OMP_NUM_THREADS=1), so that load from elsewhere falls on both
alike; the pairs run one after another. Reported per run: what auto chose (mygpt/precision.py's probe),
training steps a second (evaluations excluded), the final validation loss on the whole validation tenth,
and the model's FLOP/s (nanoGPT's count: 6N + 12·L·C·T per token) as a fraction of torch.mm's FLOP/s in the
same precision, measured in this process after the races on one thread at the model's widest product.

steps: time per training step only, in one process on one thread, each of bench_modern's runs (default; modern:
the modern preset; modern_tw: modern with circulant time weighting and token shift) at each shape in fp32, auto
and auto with compile=True, one Trainer each, in alternating rounds of --steps steps after one warm-up round
(which holds the compiles); reported per run: what auto chose, the median ms per step and each precision's
speed as a multiple of fp32's of the same run, round by round (the range).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from machine import cpu_description
from bench_modern import datasets, race_config, read_text
from mygpt import GPT, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "chargpt": (4, 4, 128, 64, 12),
    "6x384": (6, 6, 384, 256, 8),
}
PRECISIONS = ("fp32", "auto")


def overrides(shape, seed, precision):
    n_layer, n_head, n_embd, block_size, batch_size = SHAPES[shape]
    return [f"--model.n_layer={n_layer}", f"--model.n_head={n_head}", f"--model.n_embd={n_embd}",
            f"--data.block_size={block_size}", f"--trainer.batch_size={batch_size}",
            f"--system.seed={seed}", f"--trainer.seed={seed}", f"--trainer.precision={precision}"]


def race_pair(shape, seed, steps, text, folder):
    """Run fp32 and auto from one seed at once; their results (bench_modern's run records), by precision."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    outs = {p: os.path.join(folder, f"{shape}-{seed}-{p}.json") for p in PRECISIONS}
    procs = {p: subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "bench_modern.py"), "run", "default",
                                  text or "", str(steps), outs[p], *overrides(shape, seed, p)], env=env)
             for p in PRECISIONS}
    for p, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"the {shape} run with precision={p}, seed {seed}, failed")
    return {p: json.load(open(outs[p])) for p in PRECISIONS}


def model_flops_per_step(shape, params):
    n_layer, _, n_embd, block_size, batch_size = SHAPES[shape]
    return (6 * params + 12 * n_layer * n_embd * block_size) * block_size * batch_size


def mm_flops(shape, dtype):
    """torch.mm's FLOP/s on one thread at the shape's MLP product: (B·T, C) @ (C, 4C), best of 5."""
    _, _, n_embd, block_size, batch_size = SHAPES[shape]
    a = torch.randn(block_size * batch_size, n_embd, dtype=dtype)
    b = torch.randn(n_embd, 4 * n_embd, dtype=dtype)
    torch.mm(a, b)
    reps = max(1, int(2e9 // (2 * a.shape[0] * n_embd * 4 * n_embd)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * a.shape[0] * n_embd * 4 * n_embd / best


def mean(xs):
    return sum(xs) / len(xs)


def report(shape, steps, pairs):
    torch.set_num_threads(1)
    peak = {"fp32": mm_flops(shape, torch.float32), "bf16": mm_flops(shape, torch.bfloat16)}
    print(f"\n{shape} ({'x'.join(map(str, SHAPES[shape][:3]))}, block {SHAPES[shape][3]}, batch {SHAPES[shape][4]}), "
          f"{steps} steps, one thread per run; torch.mm at its MLP product: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'seed':>5} {'run':>5} {'chose':>5} {'steps/s':>8} {'val loss':>9} {'GFLOP/s':>8} {'of mm':>6}")
    speed = {p: [] for p in PRECISIONS}
    loss = {p: [] for p in PRECISIONS}
    for seed, pair in pairs.items():
        for p, r in pair.items():
            chose = r.get("precision", p)
            rate = r["steps"] / r["train_seconds"]
            flops = model_flops_per_step(shape, r["params"]) * rate
            speed[p].append(rate)
            loss[p].append(r["val_loss"])
            print(f"{seed:>5} {p:>5} {chose:>5} {rate:>8.2f} {r['val_loss']:>9.4f} {flops / 1e9:>8.1f} "
                  f"{flops / peak[chose]:>6.2f}")
    ratios = [a / f for a, f in zip(speed["auto"], speed["fp32"])]
    print(f"auto/fp32 speed: {', '.join(f'{x:.2f}x' for x in ratios)} (mean {mean(ratios):.2f}x); "
          f"mean val loss fp32 {mean(loss['fp32']):.4f}, auto {mean(loss['auto']):.4f} "
          f"(auto - fp32 {mean(loss['auto']) - mean(loss['fp32']):+.4f} nats/char)")


STEP_SETTINGS = {"fp32": ["--trainer.precision=fp32"], "auto": ["--trainer.precision=auto"],
                 "auto+compile": ["--trainer.precision=auto", "--trainer.compile=True"]}


def step_trainer(run, shape, setting, text):
    """A Trainer of bench_modern's run at shape, with one of STEP_SETTINGS, on the training nine tenths of text."""
    C = race_config(run)
    C.merge_from_args(overrides(shape, 1, "fp32") + STEP_SETTINGS[setting])
    tokenizer, train, _ = datasets(text, C.data.block_size)
    C.model.vocab_size, C.model.block_size = tokenizer.vocab_size, C.data.block_size
    C.trainer.max_iters = 10 ** 9
    torch.manual_seed(0)
    return Trainer(C.trainer, GPT(C.model), train)


def step_times(shapes, steps, rounds, runs):
    torch.set_num_threads(1)
    text, _ = read_text(None)
    for shape, n in zip(shapes, steps):
        trainers = {(run, s): step_trainer(run, shape, s, text) for run in runs for s in STEP_SETTINGS}
        times = {key: [] for key in trainers}
        for round_ in range(rounds + 1):  # alternating rounds; the first is warm-up (and compiles)
            for key, trainer in trainers.items():
                trainer.config.max_iters = trainer.iter_num + n
                start = time.perf_counter()
                trainer.run()
                if round_:
                    times[key].append((time.perf_counter() - start) / n)
        print(f"\n{shape} ({'x'.join(map(str, SHAPES[shape][:3]))}, block {SHAPES[shape][3]}, batch "
              f"{SHAPES[shape][4]}), {rounds} rounds of {n} steps, one thread, load average {os.getloadavg()[0]:.2f}")
        for (run, setting), t in times.items():
            ratios = [f / mine for f, mine in zip(times[run, "fp32"], t)]
            print(f"  {run:<10} {setting:<13} {trainers[run, setting].config.precision:>5} "
                  f"{1000 * statistics.median(t):8.1f} ms  {statistics.median(ratios):5.2f}x fp32 "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    if argv and argv[0] == "steps":
        print(f"torch {torch.__version__}, {cpu_description()}")
        return step_times(opts.get("shapes", "chargpt,6x384").split(","),
                          [int(s) for s in opts.get("steps", "30,3").split(",")], int(opts.get("rounds", 3)),
                          opts.get("runs", "default,modern,modern_tw").split(","))
    seeds = range(1, int(opts.get("seeds", 3)) + 1)
    shapes = opts.get("shapes", "chargpt,6x384").split(",")
    steps = [int(s) for s in opts.get("steps", "2000,150").split(",")]
    unknown = set(shapes) - set(SHAPES)
    if unknown or len(steps) != len(shapes):
        sys.exit(f"shapes are {', '.join(SHAPES)}, with one --steps entry each\n{__doc__}")
    print(f"torch {torch.__version__}, {cpu_description()}, load average {os.getloadavg()[0]:.2f} before the runs")
    with tempfile.TemporaryDirectory() as folder:
        results = {shape: {seed: race_pair(shape, seed, n, opts.get("text"), folder) for seed in seeds}
                   for shape, n in zip(shapes, steps)}
    for shape, n in zip(shapes, steps):
        report(shape, n, results[shape])


if __name__ == "__main__":
    main(sys.argv[1:])
