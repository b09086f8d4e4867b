"""
Training and generation speed of mygpt against Hugging Face transformers' GPT-2, in one run.

    python bench/bench_model.py              # everything, ~5 minutes on 2 cores
    python bench/bench_model.py --quick      # fewer repeats
    python bench/bench_model.py --dropout=0.1
    python bench/bench_model.py --generation-only   # just the generation table, ~1 minute
    python bench/bench_model.py --generation-only --threads 1   # on one thread (2 by default)

Training: the seed's shape (n_layer 3, n_head 8, n_embd 512, block 128, vocab 65, batch 16),
forward + backward + AdamW, rounds interleaved across models so machine noise hits all alike.
MFU = tokens/s * (6 N + 12 n_layer n_embd block_size) / (FLOP/s of a 2048x2048 fp32 matmul, measured here).
Generation: 200 new tokens, batch 1, greedy, on the same shape with block_size 256 so that every
model holds the whole sequence (transformers cannot slide a window); mygpt's one-token steps in one C++ call
(mygpt/decode.cpp) and, in the rows "forward's steps", through model.forward as before it; plain, with the
seed's circulant time weighting, and with the 'modern' preset's model switches.
Peak memory: the maximum resident set of a fresh process doing training steps, per model.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

import torch  # noqa: E402

from mygpt import GPT, CfgNode, apply_recipe, decode  # noqa: E402
from machine import cpu_description  # noqa: E402

SHAPE = dict(n_layer=3, n_head=8, n_embd=512, vocab_size=65, block_size=128)
BATCH = 16
DROPOUT = 0.0  # --dropout; the MFU count has no dropout FLOPs, but it costs time
TRAIN_MODELS = ("mygpt", "mygpt-full", "mygpt-circulant", "transformers")


def mygpt_model(time_weighting=None, block_size=SHAPE["block_size"], preset=None):
    c = GPT.get_default_config()
    if preset is not None:
        apply_recipe(CfgNode(model=c), preset)
    c.merge_from_dict({**SHAPE, "block_size": block_size, "time_weighting": time_weighting})
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = DROPOUT
    return GPT(c)


def transformers_model(block_size=SHAPE["block_size"]):
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=SHAPE["vocab_size"], n_positions=block_size, n_embd=SHAPE["n_embd"],
                                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=DROPOUT,
                                     embd_pdrop=DROPOUT, attn_pdrop=DROPOUT, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def build(name, block_size=SHAPE["block_size"]):
    """(model, optimizer, step) where step(x, y) does one training step."""
    torch.manual_seed(0)
    train_config = CfgNode(learning_rate=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    if name == "transformers":
        model = transformers_model(block_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))

        def loss_of(x, y):
            logits = model(x).logits
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    else:
        time_weighting = {"mygpt": None, "mygpt-full": "full", "mygpt-circulant": "circulant"}[name]
        model = mygpt_model(time_weighting, block_size)
        optimizer = model.configure_optimizers(train_config)

        def loss_of(x, y):
            return model(x, y)[1]

    model.train()

    def step(x, y):
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, step


def batch():
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]))
    return x, torch.roll(x, -1, dims=1)


def matmul_flops(repeats=10):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / statistics.median(times)


def flops_per_token(model):
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    return 6 * n + 12 * SHAPE["n_layer"] * SHAPE["n_embd"] * SHAPE["block_size"]


def bench_training(rounds, steps_per_round):
    steps = {name: build(name)[1] for name in TRAIN_MODELS}
    flops = flops_per_token(mygpt_model())
    x, y = batch()
    for step in steps.values():  # warm up allocators and kernels
        step(x, y)
    times = {name: [] for name in steps}
    peaks = []
    for _ in range(rounds):
        peaks.append(matmul_flops())
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                step(x, y)
            times[name].append((time.perf_counter() - t0) / steps_per_round)
    peak = statistics.median(peaks)
    tokens = BATCH * SHAPE["block_size"]
    print(f"\ntraining step, batch {BATCH} x {SHAPE['block_size']}, {torch.get_num_threads()} threads, "
          f"peak fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<18}{'tokens/s':>10}{'MFU':>8}{'vs mygpt':>10}")
    base = tokens / statistics.median(times["mygpt"])
    for name, t in times.items():
        rate = tokens / statistics.median(t)
        print(f"{name:<18}{rate:>10.0f}{rate * flops / peak:>8.3f}{rate / base:>10.3f}")


def bench_generation(repeats):
    torch.manual_seed(0)
    ours = mygpt_model(block_size=256).eval()
    circulant = mygpt_model("circulant", block_size=256).eval()
    modern = mygpt_model(block_size=256, preset="modern").eval()
    theirs = transformers_model(block_size=256).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    mask = torch.ones_like(prompt)
    runs = {
        "mygpt cached": lambda: ours.generate(prompt, 200),
        "  forward's steps": lambda: forward_steps(lambda: ours.generate(prompt, 200)),
        "circulant cached": lambda: circulant.generate(prompt, 200),
        "  forward's steps ": lambda: forward_steps(lambda: circulant.generate(prompt, 200)),
        "modern cached": lambda: modern.generate(prompt, 200),
        "  forward's steps  ": lambda: forward_steps(lambda: modern.generate(prompt, 200)),
        "mygpt uncached": lambda: ours.generate(prompt, 200, use_cache=False),
        "transformers": lambda: theirs.generate(prompt, max_new_tokens=200, min_new_tokens=200, do_sample=False,
                                                attention_mask=mask, pad_token_id=0),
        "Linear layers only": lambda: linears_only(ours),
    }
    rates = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm up
            run()
        for _ in range(repeats):  # rounds interleaved across the runs, so machine noise hits all alike
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                rates[name].append(200 / (time.perf_counter() - t0))
    print(f"\ngeneration, 200 new tokens, batch 1, greedy (block_size 256), {cpu_description()}, "
          f"{torch.get_num_threads()} threads, median (min-max) of {repeats} interleaved rounds")
    print(f"{'model':<20}{'tokens/s':>10}{'range':>12}{'cached mygpt is':>18}")
    cached = statistics.median(rates["mygpt cached"])
    for name, r in rates.items():
        rate = statistics.median(r)
        note = "   (reading every weight once per token: the ceiling of any fp32 decoder of this shape)" \
            if name == "Linear layers only" else ""
        print(f"{name:<20}{rate:>10.0f}{f'{min(r):.0f}-{max(r):.0f}':>12}{cached / rate:>17.2f}x{note}")


def forward_steps(run):
    """run() with every one-token step in model.forward, as before mygpt/decode.cpp ran them in one C++ call."""
    unsupported = decode.unsupported
    decode.unsupported = lambda model: "the benchmark's forward_steps"
    try:
        run()
    finally:
        decode.unsupported = unsupported


def linears_only(model):
    """The matrix-vector products of 200 decoding steps and nothing else."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {n: torch.randn(1, 1, n) for n in {m.in_features for m in layers}}
    for _ in range(200):
        for layer in layers:
            layer(inputs[layer.in_features])


def peak_memory_probe(name):
    """Runs in a child process: a few training steps, then print the peak RSS in MiB."""
    model, step = build(name)
    x, y = batch()
    for _ in range(3):
        step(x, y)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and would report the parent's size
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(peak_kib / 1024)


def bench_memory():
    print(f"\npeak RSS of a fresh process doing training steps (batch {BATCH})")
    for name in TRAIN_MODELS:
        out = subprocess.run([sys.executable, __file__, "--memory-probe", name, f"--dropout={DROPOUT}"], check=True,
                             capture_output=True, text=True).stdout
        print(f"{name:<18}{float(out.split()[-1]):>8.0f} MiB")


def main():
    global DROPOUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dropout", type=float, default=DROPOUT)
    parser.add_argument("--generation-only", action="store_true", help="only the generation table")
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (OMP_NUM_THREADS does not set them)")
    parser.add_argument("--memory-probe")
    args = parser.parse_args()
    DROPOUT = args.dropout
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        peak_memory_probe(args.memory_probe)
        return
    print(f"torch {torch.__version__}, dropout {DROPOUT}")
    if args.generation_only:
        bench_generation(repeats=3 if args.quick else 7)
        return
    bench_training(rounds=2 if args.quick else 5, steps_per_round=3 if args.quick else 5)
    bench_generation(repeats=3 if args.quick else 7)
    bench_memory()


if __name__ == "__main__":
    main()
