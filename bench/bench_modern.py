"""The chargpt race: mygpt's default GPT against the modern recipe (--model.preset=modern), side by side.

    python bench/bench_modern.py race  [--text=FILE] [--steps=2000] [--runs=default,modern,modern_tw]
    python bench/bench_modern.py gpt2  [--text=FILE] [--budget=420] [--runs=default,modern,modern_tw]
    python bench/bench_modern.py steps [--steps=40]          time per training step of each switch alone

race: nanoGPT's CPU recipe for shakespeare_char, as projects/chargpt sets it (4 layers, 4 heads, 128 wide,
block 64, batch 12, 2000 steps, AdamW 1e-3 with nanoGPT's cosine, no dropout), one process per run, all
started at once, each on one thread (OMP_NUM_THREADS=1), so that load from elsewhere falls on all alike.
Every 100 steps the clock stops while the loss on a fixed sample of 240 validation windows is measured;
at the end each model is scored on the whole validation tenth (non-overlapping windows of 64). Reported:
final validation loss, training wall time (evaluations excluded), and the training time a run took to
reach the default's final sampled validation loss. modern_short and modern_tw_short are the recipes run for a fifth of
the steps (warmup and cooldown fitted to them): a budget at which they still end below the default.

The text is tiny shakespeare (mygpt's download cache), or --text=FILE; where the download fails, Python's
own help topics (pydoc_data, ~465k characters of English) stand in, and the report says so.

gpt2: the same runs on GPT-2 BPE tokens, at projects/gpt2's `cpu` config (4 layers, 4 heads, 128 wide, block
128, batch 8, AdamW 1e-3 with nanoGPT's cosine), all started at once on one thread each, for the same wall
time: each run trains for --budget seconds (evaluations excluded) and stops at the first step past it. The
config's 300 steps do not fit a short budget on a loaded machine, so each run fits its schedule to the
budget: every 10 steps, until 55% of the budget is spent (before the modern recipe's cooldown starts), the
schedule's end (max_iters and final_tokens) is set where the budget runs out at the mean step time so far.
At every eighth of the budget the clock stops while the val loss and bits per byte of the first 10 val
batches (10,240 tokens, the config's eval_iters) are measured; at the end each model is scored on the whole
val split. The text (as for race) is prepared with mygpt.prepare_corpus, the first 90% training.

steps: the default model and the default with each switch alone, then the whole modern recipe, trained
for --steps steps at the race's shape (after 5 warm-up steps), in one process on one thread, in
alternating rounds.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# this checkout's mygpt, not an installed one: the race's processes run this file as a script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mygpt import (GPT, Trainer, apply_recipe, describe_tokenizer, load_tokenizer, prepare_corpus, score,
                   tiny_shakespeare)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = {  # name: overrides of projects/chargpt's config (a preset first)
    "default": {},
    "modern": {"preset": "modern"},
    "modern_tw": {"preset": "modern", "model": dict(time_weighting="circulant", token_shift=True)},
    # the recipe with a fifth of the steps, its schedule (and cooldown) fitted to them
    "modern_short": {"preset": "modern", "steps_fraction": 0.2},
    "modern_tw_short": {"preset": "modern", "model": dict(time_weighting="circulant", token_shift=True),
                        "steps_fraction": 0.2},
}
SWITCHES = {  # name: (model overrides, trainer overrides), each alone on the default
    "default": ({}, {}),
    "pos_emb=rope": (dict(pos_emb="rope"), {}),
    "norm=rmsnorm": (dict(norm="rmsnorm"), {}),
    "embd_norm": (dict(embd_norm=True), {}),
    "qk_norm": (dict(qk_norm=True), {}),
    "mlp=relu2": (dict(mlp="relu2"), {}),
    "mlp=swiglu": (dict(mlp="swiglu"), {}),
    "n_kv_head=2": (dict(n_kv_head=2), {}),
    "logit_softcap=15": (dict(logit_softcap=15.0), {}),
    "bias=False": (dict(bias=False), {}),
    "tie_weights=False": (dict(tie_weights=False), {}),
    "optimizer=muon": ({}, dict(optimizer="muon")),
    "modern (all)": ("modern", {}),
    "modern + circulant + token_shift": ("modern", dict(time_weighting="circulant", token_shift=True)),
}
EVAL_EVERY, EVAL_WINDOWS = 100, 240
GPT2_EVALS, GPT2_REFIT_EVERY, GPT2_REFIT_UNTIL = 8, 10, 0.55  # evaluations per budget; schedule fitting (see gpt2)


def project(name, script):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "projects", name, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chargpt():
    return project("chargpt", "chargpt.py")


def read_text(path):
    """(text, its name): the file, else tiny shakespeare, else Python's help topics."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    try:
        path = tiny_shakespeare()
        with open(path, encoding="utf-8") as f:
            return f.read(), "tiny shakespeare"
    except Exception as err:  # no network: a stand-in every Python has
        import pydoc_data.topics
        print(f"(tiny shakespeare unavailable: {type(err).__name__}; using pydoc_data's help topics)", file=sys.stderr)
        topics = pydoc_data.topics.topics
        return "".join(topics[k] for k in sorted(topics)), "pydoc_data help topics (tiny shakespeare unavailable)"


def race_config(run):
    """projects/chargpt's config with a run's overrides."""
    C = chargpt().get_config()
    overrides = RUNS[run]
    if overrides.get("preset"):
        apply_recipe(C, overrides["preset"])
    C.model.merge_from_dict(overrides.get("model", {}))
    C.trainer.eval_interval = 0
    C.trainer.ckpt_path = None
    C.trainer.quiet = True
    C.trainer.log_interval = 0
    C.trainer.device = "cpu"
    C.trainer.precision = "fp32"  # nanoGPT's CPU runs are fp32; bench_precision.py races the precisions
    return C


def datasets(text, block_size):
    project = chargpt()
    tokenizer = load_tokenizer(describe_tokenizer(sorted(set(text))))
    cut = project.split_point(len(text), 0.1)
    train = project.CharDataset(text[:cut], tokenizer, block_size)
    val = project.CharDataset(text[cut:], tokenizer, block_size)
    return tokenizer, train, val


@torch.no_grad()
def val_loss(model, val, starts, batch=64):
    """Mean loss per character over the windows of val starting at `starts`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        xs, ys = zip(*(val[s] for s in starts[i:i + batch]))
        _, loss = model(torch.stack(xs), torch.stack(ys))
        total += loss.item() * len(xs) * xs[0].numel()
        count += len(xs) * xs[0].numel()
    model.train()
    return total / count


def run_one(run, text_path, steps, out, args=()):
    """One race entry, in its own process: train, sample the val loss every EVAL_EVERY steps, score at the end."""
    torch.set_num_threads(1)
    text, _ = read_text(text_path)
    C = race_config(run)
    C.merge_from_args(list(args))  # e.g. --trainer.muon_lr=0.04, for tuning
    steps = round(steps * RUNS[run].get("steps_fraction", 1.0))
    C.trainer.max_iters = steps
    tokenizer, train, val = datasets(text, C.data.block_size)
    C.model.vocab_size, C.model.block_size = tokenizer.vocab_size, C.data.block_size
    torch.manual_seed(C.system.seed)
    model = GPT(C.model)
    trainer = Trainer(C.trainer, model, train)
    sample = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:EVAL_WINDOWS].tolist()
    curve, clock = [], {"train": 0.0, "cpu": 0.0, "since": time.perf_counter(), "cpu_since": time.process_time()}

    def on_batch_end(t):
        if t.iter_num % EVAL_EVERY == 0 or t.iter_num == steps:
            clock["train"] += time.perf_counter() - clock["since"]
            clock["cpu"] += time.process_time() - clock["cpu_since"]
            curve.append({"iter": t.iter_num, "seconds": clock["train"], "val_sample": val_loss(t.model, val, sample)})
            clock["since"], clock["cpu_since"] = time.perf_counter(), time.process_time()

    trainer.add_callback("on_batch_end", on_batch_end)
    trainer.run()
    whole = list(range(0, len(val), C.data.block_size))  # every validation character predicted once
    result = {"run": run, "steps": steps, "params": model.num_parameters(), "curve": curve,
              "train_seconds": clock["train"], "cpu_seconds": clock["cpu"], "val_loss": val_loss(model, val, whole),
              "train_loss": trainer.loss, "precision": trainer.config.precision}
    with open(out, "w") as f:
        json.dump(result, f)


def side_by_side(mode, runs, args, d):
    """{run: its result}: `bench_modern.py MODE RUN *args OUT` for every run, all started at once, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {run: subprocess.Popen([sys.executable, __file__, mode, run, *args, os.path.join(d, f"{run}.json")],
                                   env=env) for run in runs}
    for run, p in procs.items():
        if p.wait() != 0:
            sys.exit(f"run {run} failed")
    return {run: json.load(open(os.path.join(d, f"{run}.json"))) for run in runs}


def race(text_path, steps, runs):
    _, name = read_text(text_path)
    with tempfile.TemporaryDirectory() as d:
        results = side_by_side("run", runs, [text_path or "", str(steps)], d)
    base = results["default"] if "default" in results else None
    print(f"\nchargpt race on {name}: {steps} steps, 4 layers, 4 heads, 128 wide, block 64, batch 12, one thread each")
    print(f"{'run':<15} {'steps':>5} {'params':>8} {'val loss':>9} {'train s':>8} {'cpu s':>7} "
          f"{'s to default final':>19} {'fraction':>9}")
    target = base["curve"][-1]["val_sample"] if base else None
    for run, r in results.items():
        reach = next((p["seconds"] for p in r["curve"] if p["val_sample"] <= target), None) if target else None
        frac = f"{reach / base['train_seconds']:.2f}" if reach is not None else "-"
        reach_s = f"{reach:.1f} (it {next(p['iter'] for p in r['curve'] if p['seconds'] == reach)})" if reach else "never"
        print(f"{run:<15} {r['steps']:>5} {r['params']:>8,} {r['val_loss']:>9.4f} {r['train_seconds']:>8.1f} "
              f"{r['cpu_seconds']:>7.1f} {reach_s:>19} {frac:>9}")
    if base:
        # Runs that end early leave the default more of the CPU afterwards, so wall fractions favour it; where the
        # default had got by the moment a run reached its loss (same machine, same load) is the fair comparison.
        seconds, iters = [0.0] + [p["seconds"] for p in base["curve"]], [0] + [p["iter"] for p in base["curve"]]
        for run, r in results.items():
            reach = next((p["seconds"] for p in r["curve"] if p["val_sample"] <= target), None)
            if run != "default" and reach is not None:
                i = next((j for j in range(1, len(seconds)) if seconds[j] >= reach), len(seconds) - 1)
                at = iters[i - 1] + (iters[i] - iters[i - 1]) * (reach - seconds[i - 1]) / (seconds[i] - seconds[i - 1])
                print(f"{run}: reached the default's final loss when the default, running beside it, was at step "
                      f"{at:.0f} of {base['steps']} ({at / base['steps']:.2f} of its run)")
        for run, r in results.items():
            if run != "default":
                print(f"{run}: {base['val_loss'] - r['val_loss']:+.3f} nats/char below the default's {steps}-step "
                      f"val loss after {r['steps']} steps, in {r['train_seconds'] / base['train_seconds']:.2f} of "
                      f"its training time ({r['cpu_seconds'] / base['cpu_seconds']:.2f} of its CPU time)")
    print("\nsampled val loss (240 windows) by step:")
    print("iter  " + "  ".join(f"{run:>15}" for run in results))
    for i, point in enumerate(max((r["curve"] for r in results.values()), key=len)):
        print(f"{point['iter']:<5} " + "  ".join(f"{r['curve'][i]['val_sample']:>15.4f}" if i < len(r["curve"])
                                                 else " " * 15 for r in results.values()))


def gpt2_args(run):
    """A race run's overrides as projects/gpt2 arguments (a preset, which get_config_from_args applies first)."""
    choices = [name for name, overrides in RUNS.items() if "steps_fraction" not in overrides]
    if run not in choices:
        sys.exit(f"gpt2: no run {run!r}; choose from {choices} (the *_short runs set a step count, while the gpt2 "
                 f"race gives every run the same wall time, --budget)")
    overrides = RUNS[run]
    preset = [f"--model.preset={overrides['preset']}"] if overrides.get("preset") else []
    return preset + [f"--model.{key}={value}" for key, value in overrides.get("model", {}).items()]


def gpt2_run(run, data_dir, budget, out):
    """One gpt2 race entry, in its own process: train for `budget` seconds, the schedule fitted to them."""
    torch.set_num_threads(1)
    gpt2 = project("gpt2", "train.py")
    C = gpt2.get_config_from_args(["cpu", f"--data.dir={data_dir}", *gpt2_args(run)])
    C.trainer.merge_from_dict(dict(eval_interval=0, ckpt_path=None, quiet=True, log_interval=0, device="cpu"))
    train, val = gpt2.open_split(C, "train"), gpt2.open_split(C, "val")
    torch.manual_seed(C.system.seed)
    model = gpt2.build_model(C, resuming=False)
    trainer = Trainer(C.trainer, model, train, tokenizer={"type": "gpt2"})
    tokens_per_step = C.trainer.batch_size * C.data.block_size
    tokenizer = load_tokenizer({"type": "gpt2"})
    curve, clock = [], {"train": 0.0, "cpu": 0.0, "since": time.perf_counter(), "cpu_since": time.process_time()}

    def measure(t, max_batches):
        s = score(t.model, val, C.trainer.batch_size, max_batches, tokenizer=tokenizer)
        return {"iter": t.iter_num, "seconds": clock["train"], "val_loss": s.loss, "bpb": s.bits_per_byte,
                "targets": s.targets}

    def on_batch_end(t):
        seconds = clock["train"] + time.perf_counter() - clock["since"]
        if seconds < GPT2_REFIT_UNTIL * budget and t.iter_num % GPT2_REFIT_EVERY == 0:
            # the schedule ends where the budget runs out at the mean step time so far (before any cooldown)
            t.config.max_iters = t.iter_num + max(1, round((budget - seconds) * t.iter_num / seconds))
            t.config.final_tokens = t.config.max_iters * tokens_per_step
        if seconds >= budget:
            t.config.max_iters = t.iter_num  # the budget is spent: stop after this step
        if seconds >= budget * (len(curve) + 1) / GPT2_EVALS or t.config.max_iters == t.iter_num:
            clock["train"], clock["cpu"] = seconds, clock["cpu"] + time.process_time() - clock["cpu_since"]
            curve.append(measure(t, C.trainer.eval_iters))
            clock["since"], clock["cpu_since"] = time.perf_counter(), time.process_time()

    trainer.add_callback("on_batch_end", on_batch_end)
    trainer.run()
    whole = measure(trainer, None)
    result = {"run": run, "steps": trainer.iter_num, "params": model.num_parameters(), "curve": curve,
              "train_seconds": clock["train"], "cpu_seconds": clock["cpu"], "val_loss": whole["val_loss"],
              "bpb": whole["bpb"], "val_targets": whole["targets"]}
    with open(out, "w") as f:
        json.dump(result, f)


def gpt2_race(text_path, budget, runs):
    for run in runs:
        gpt2_args(run)  # an unknown run is refused before anything starts
    text, name = read_text(text_path)
    with tempfile.TemporaryDirectory() as d:
        source = os.path.join(d, "text.txt")
        with open(source, "w", encoding="utf-8") as f:
            f.write(text)
        meta = prepare_corpus(source, os.path.join(d, "data"), tokenizer="gpt2", progress=False)
        results = side_by_side("gpt2run", runs, [os.path.join(d, "data"), str(budget)], d)
    print(f"\ngpt2 race on {name} ({meta['train']['tokens']:,} train, {meta['val']['tokens']:,} val GPT-2 tokens): "
          f"projects/gpt2's cpu config, {budget} s of training each, one thread each")
    print(f"{'run':<10} {'steps':>5} {'params':>10} {'train s':>8} {'cpu s':>7} {'val loss':>9} {'bits/byte':>10}")
    for run, r in results.items():
        print(f"{run:<10} {r['steps']:>5} {r['params']:>10,} {r['train_seconds']:>8.1f} {r['cpu_seconds']:>7.1f} "
              f"{r['val_loss']:>9.4f} {r['bpb']:>10.4f}")
    print("\nval loss / bits per byte on the first 10 val batches, at each eighth of the budget (s: step):")
    print("  s     " + "  ".join(f"{run:>24}" for run in results))
    for i in range(max(len(r["curve"]) for r in results.values())):
        cells = [f"{p['val_loss']:.4f} / {p['bpb']:.4f} (it {p['iter']})" if (p := (r["curve"][i:i + 1] or [None])[0])
                 else "" for r in results.values()]
        print(f"  {budget * (i + 1) / GPT2_EVALS:>5.0f} " + "  ".join(f"{c:>24}" for c in cells))


def step_times(steps):
    torch.set_num_threads(1)
    text, name = read_text(None)
    trainers = {}
    for label, (model_kw, trainer_kw) in SWITCHES.items():
        C = race_config("default")
        if model_kw == "modern":
            apply_recipe(C, "modern")
            C.model.merge_from_dict(trainer_kw)
        else:
            C.model.merge_from_dict(model_kw)
            C.trainer.merge_from_dict(trainer_kw)
        tokenizer, train, _ = datasets(text, C.data.block_size)
        C.model.vocab_size, C.model.block_size = tokenizer.vocab_size, C.data.block_size
        C.trainer.max_iters = 10 ** 9
        torch.manual_seed(0)
        trainers[label] = Trainer(C.trainer, GPT(C.model), train)
    times = {label: [] for label in trainers}
    for round_ in range(3):  # alternating rounds; the first is warm-up
        for label, trainer in trainers.items():
            trainer.config.max_iters = trainer.iter_num + (5 if round_ == 0 else steps)
            start = time.perf_counter()
            trainer.run()
            if round_:
                times[label].append((time.perf_counter() - start) / steps)
    base = min(times["default"])
    print(f"\ntime per training step, race shape (4x128, block 64, batch 12), one thread, best of 2 rounds of {steps}:")
    for label, t in times.items():
        print(f"  {label:<34} {1000 * min(t):7.2f} ms  {min(t) / base:5.2f}x")


def main(argv):
    mode = argv[0] if argv else "race"
    opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--"))
    if mode == "run":
        run_one(argv[1], argv[2] or None, int(argv[3]), argv[4], argv[5:])
    elif mode == "race":
        race(opts.get("text"), int(opts.get("steps", 2000)), opts.get("runs", "default,modern,modern_tw,modern_short,modern_tw_short").split(","))
    elif mode == "gpt2run":
        gpt2_run(argv[1], argv[2], float(argv[3]), argv[4])
    elif mode == "gpt2":
        runs = opts.get("runs", "default,modern,modern_tw").split(",")
        gpt2_race(opts.get("text"), float(opts.get("budget", 420)), runs)
    elif mode == "steps":
        step_times(int(opts.get("steps", 40)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
