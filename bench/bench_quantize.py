"""
int8 inference (mygpt.quantize) against fp32 mygpt and fp32 transformers GPT-2, in one run.

    OMP_NUM_THREADS=1 python bench/bench_quantize.py                 # options, speed, memory, size, quality: ~15 minutes
    OMP_NUM_THREADS=1 python bench/bench_quantize.py --quick         # fewer rounds and training steps
    OMP_NUM_THREADS=1 python bench/bench_quantize.py --adder=/tmp/adder_q   # + the adder's test accuracy
    OMP_NUM_THREADS=1 python bench/bench_quantize.py --only-where-it-pays   # just that table: ~5 minutes
    OMP_NUM_THREADS=2 python bench/bench_quantize.py --only-generation      # GPT-2's shape, generation: ~1 minute

Speed, at GPT-2's shape (12 layers, 12 heads, 768 wide, vocab 50257, block 1024) and the seed's
(3 layers, 8 heads, 512 wide, vocab 65, block 128), random weights, rounds interleaved across models:
cached greedy generation at batch 1 (tokens/s after a 1-token prompt, within block_size, since
transformers cannot slide its window) and a batch-32 forward of 128 tokens. "Linear layers only" times
just the int8/fp32 matrix products of one decoding step: the ceiling set by reading the weights.
Memory: the peak resident set (VmHWM) of a fresh process that builds or loads one model and generates.
Size: the fp32 weights saved with torch.save against save_quantized.
int8 options: every GPT-2 Linear shape at batch 1 under fp32, torch.ao's quantize_dynamic, torchao
(eager; --compile-torchao adds torch.compile) and mygpt's Int8Linear; --only-kernels prints just this table.
Quality: a small character model trained briefly on English text (Python's help topics), validation
loss and next-token agreement fp32 against int8, vanilla and time-weighted.
--adder=WORK_DIR: the test accuracy of projects/adder's trained checkpoint, fp32 and int8.
Where int8 pays: int8/fp32 speed of cached generation at batch 1 and of a batch-32 forward, with the int8
kernel in every Linear (layers="all") and only where it is measured faster (quantize's default), at
chargpt's shape (4 layers, 128 wide, vocab 65, block 64), the gpt2 project's cpu recipe (the same with
GPT-2's vocabulary, block 128), 6 layers 384 wide (nanoGPT's shakespeare_char) and GPT-2's; and the Linear
shapes whose int8 kernel the default chose, at 1 row and at the batch's rows, and what its measuring
cost at each (its first forward at that size beyond that of the int8-everywhere model).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mygpt import GPT, Int8Linear, load_quantized, save_quantized  # noqa: E402
from machine import cpu_description  # noqa: E402

SHAPES = {
    "chargpt": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65, block_size=64),
    "gpt2-cpu": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=50257, block_size=128),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "seed": dict(n_layer=3, n_head=8, n_embd=512, vocab_size=65, block_size=128),
}
MODELS = ("mygpt fp32", "mygpt int8", "transformers fp32")


def mygpt_model(shape, **kw):
    c = GPT.get_default_config()
    c.merge_from_dict({**SHAPES[shape], **kw})
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = 0.0
    torch.manual_seed(0)
    return GPT(c).eval()


def transformers_model(shape):
    import transformers
    transformers.logging.set_verbosity_error()
    s = SHAPES[shape]
    config = transformers.GPT2Config(vocab_size=s["vocab_size"], n_positions=s["block_size"], n_embd=s["n_embd"],
                                     n_layer=s["n_layer"], n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def build(shape, name):
    if name == "transformers fp32":
        return transformers_model(shape)
    model = mygpt_model(shape)
    return model.quantize(inplace=True) if name == "mygpt int8" else model


def generate(model, prompt, n):
    if hasattr(model, "transformer") and hasattr(model, "check_input"):  # mygpt
        return model.generate(prompt, n)
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)


@torch.inference_mode()
def forward(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out.logits


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def linear_ceiling(model, repeats=20):
    """Seconds per decoding step spent in just the Linear layers' products at batch 1 (weights read once each)."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]
    with torch.inference_mode():
        for m, x in zip(linears, inputs):
            m(x)
        start = time.perf_counter()
        for _ in range(repeats):
            for m, x in zip(linears, inputs):
                m(x)
    return (time.perf_counter() - start) / repeats


def speeds(models, batch, new_tokens, rounds):
    """Per model, the median tokens/s of cached greedy generation at batch 1 (after a 1-token prompt) and of a
    forward of batch (None: no forward, and no figures for it), over interleaved rounds."""
    prompt = torch.zeros(1, 1, dtype=torch.long)
    for model in models.values():  # warm up: first calls pack weights, allocate and time int8 against fp32
        generate(model, prompt, 4)
        if batch is not None:
            forward(model, batch)
    gen, fwd = {n: [] for n in models}, {n: [] for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            gen[name].append(new_tokens / timed(generate, model, prompt, new_tokens))
            if batch is not None:
                fwd[name].append(batch.numel() / timed(forward, model, batch))
    return ({n: statistics.median(v) for n, v in gen.items()},
            {n: statistics.median(v) for n, v in fwd.items() if v})


def bench_speed(shape, rounds, new_tokens):
    models = {name: build(shape, name) for name in MODELS}
    gen, fwd = speeds(models, torch.randint(0, SHAPES[shape]["vocab_size"], (32, 128)), new_tokens, rounds)
    ceiling = {name: 1 / linear_ceiling(models[name]) for name in ("mygpt fp32", "mygpt int8")}
    return gen, fwd, ceiling


def bench_where_int8_pays(shape, rounds, new_tokens):
    """int8/fp32 speed of generation and of a batch-32 forward, int8 in every Linear and only where it pays;
    the Linear shapes (in x out) whose int8 kernel the latter chose, at 1 row and at the batch's rows; and the
    seconds its measuring took at each of those sizes."""
    fp32 = mygpt_model(shape)
    models = {"fp32": fp32, "all": fp32.quantize(layers="all"), "auto": fp32.quantize()}
    block = SHAPES[shape]["block_size"]
    batch = torch.randint(0, SHAPES[shape]["vocab_size"], (32, min(128, block)))
    # what measuring costs, once per size: the first forward of "auto" beyond that of "all" (both pack weights)
    cost = [timed(forward, models["auto"], x) - timed(forward, models["all"], x) for x in (batch[:1, :1], batch)]
    gen, fwd = speeds(models, batch, min(new_tokens, block - 1), rounds)
    # the shapes whose int8 kernel the warm-up's measurements chose
    linears = {(m.in_features, m.out_features): m for m in models["auto"].modules() if isinstance(m, Int8Linear)}
    int8_at = {rows: [f"{i}x{o}" for (i, o), m in sorted(linears.items()) if m.int8_pays(rows)]
               for rows in (1, batch.numel())}
    return ({n: gen[n] / gen["fp32"] for n in ("all", "auto")}, {n: fwd[n] / fwd["fp32"] for n in ("all", "auto")},
            int8_at, len(linears), cost)


def print_generation(rounds, new_tokens=40):
    """Only cached generation at GPT-2's shape: int8 against fp32 mygpt and fp32 transformers, interleaved rounds."""
    gen, _ = speeds({name: build("gpt2", name) for name in MODELS}, None, new_tokens, rounds)
    print(f"\ngpt2 shape, cached greedy generation of {new_tokens} tokens at batch 1, median of {rounds} "
          f"interleaved rounds")
    for name, rate in gen.items():
        print(f"| {name} | {rate:.1f} tokens/s | {rate / gen['transformers fp32']:.2f}x transformers fp32 |")


def print_where_int8_pays(quick):
    """The table, with more rounds where they are cheap: a small model's forward takes tens of ms, which another
    process on the machine can double."""
    rounds, new_tokens = {"gpt2": 2 if quick else 3}, 50 if quick else 100
    default_rounds = 3 if quick else 9
    print(f"\nwhere int8 pays: int8/fp32 tokens/s, median of {default_rounds} interleaved rounds ({rounds['gpt2']} at "
          f"gpt2's shape); cached greedy generation of {new_tokens} tokens (at most block_size - 1) at batch 1, "
          f"forward of 32 x min(128, block_size) tokens")
    print("| model | generation, int8 everywhere | generation, where it pays | forward, everywhere "
          "| forward, where it pays | int8 kernel chosen at 1 row | at the batch's rows | measuring, once: 1 row "
          "| the batch's rows |")
    print("| --- " * 9 + "|")
    for shape in ("chargpt", "gpt2-cpu", "6x384", "gpt2"):
        gen, fwd, int8_at, shapes, cost = bench_where_int8_pays(shape, rounds.get(shape, default_rounds),
                                                                new_tokens)
        chosen = [", ".join(names) if len(names) < shapes else f"all {shapes} shapes" for names in int8_at.values()]
        print(f"| {shape} {SHAPES[shape]} | {gen['all']:.2f}x | {gen['auto']:.2f}x | {fwd['all']:.2f}x "
              f"| {fwd['auto']:.2f}x | {chosen[0] or 'none'} | {chosen[1] or 'none'} | {cost[0] * 1e3:.0f} ms "
              f"| {cost[1] * 1e3:.0f} ms |", flush=True)


def peak_rss_child(shape, name, path):
    """Run in a fresh process: build (or load from path) one model, generate, print VmHWM in MiB."""
    model = load_quantized(path) if name == "mygpt int8" else build(shape, name)
    generate(model, torch.zeros(1, 1, dtype=torch.long), 16)
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM")))


def peak_rss(shape, name, path):
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", shape, name, path or ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def file_sizes(shape, directory):
    """(fp32 bytes, int8 bytes, path of the int8 file) for the shape's model."""
    model = mygpt_model(shape)
    fp32_path, int8_path = os.path.join(directory, f"{shape}-fp32.pt"), os.path.join(directory, f"{shape}-int8.pt")
    torch.save(model.state_dict(), fp32_path)  # a tied matrix is stored once
    save_quantized(model.quantize(inplace=True), int8_path)
    return os.path.getsize(fp32_path), os.path.getsize(int8_path), int8_path


# ---------------------------------------------------------------- the int8 options, Linear by Linear

def kernel_options(compile_torchao):
    """name -> function making the quantized version of an nn.Linear, for every int8 option importable here."""
    import copy
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's, on every call
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")  # quantized tensors are deprecated too
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    def wrap(linear):
        return torch.nn.Sequential(copy.deepcopy(linear))

    options = {
        "fp32 nn.Linear": lambda linear: linear,
        "torch.ao quantize_dynamic (per channel)":
            lambda linear: quantize_dynamic(wrap(linear), {torch.nn.Linear: per_channel_dynamic_qconfig}),
        "mygpt Int8Linear": Int8Linear.from_linear,
    }
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return options

    def torchao(config, compiled):
        def make(linear):
            module = wrap(linear)
            quantize_(module, config())
            return torch.compile(module) if compiled else module
        return make
    if compile_torchao:
        torch._dynamo.config.recompile_limit = 64  # one compiled graph per Linear shape and option
    for compiled in (False, True) if compile_torchao else (False,):
        suffix = ", torch.compile" if compiled else ""
        options[f"torchao Int8WeightOnly{suffix}"] = torchao(Int8WeightOnlyConfig, compiled)
        options[f"torchao Int8DynamicActivationInt8Weight{suffix}"] = torchao(Int8DynamicActivationInt8WeightConfig,
                                                                               compiled)
    return options


def bench_kernels(rounds, repeats, compile_torchao):
    """Median microseconds per call at batch 1 of every Linear shape of GPT-2, per option, over interleaved rounds;
    and per token (12 blocks + head)."""
    n = 768
    shapes = {"c_attn": (n, 3 * n), "attn.c_proj": (n, n), "c_fc": (n, 4 * n), "mlp.c_proj": (4 * n, n),
              "lm_head": (n, 50257)}
    torch.manual_seed(0)
    linears = {name: torch.nn.Linear(i, o).eval() for name, (i, o) in shapes.items()}
    modules = {option: {name: make(linear) for name, linear in linears.items()}
               for option, make in kernel_options(compile_torchao).items()}
    inputs = {name: torch.randn(1, 1, linear.in_features) for name, linear in linears.items()}
    samples = {option: {name: [] for name in shapes} for option in modules}
    warmup = {}
    with torch.inference_mode():
        for option, row in modules.items():  # the first calls pack weights, or compile
            start = time.perf_counter()
            for name, module in row.items():
                module(inputs[name])
            warmup[option] = time.perf_counter() - start
        for _ in range(rounds):
            for option, row in modules.items():
                for name, module in row.items():
                    start = time.perf_counter()
                    for _ in range(repeats):
                        module(inputs[name])
                    samples[option][name].append((time.perf_counter() - start) / repeats * 1e6)
        # a fast kernel must also be right: the largest error against fp32 on fresh inputs, relative to the output
        error = {option: max(float((module(x) - linears[name](x)).abs().max() / linears[name](x).abs().max())
                             for name, module in row.items() for x in [torch.randn_like(inputs[name])])
                 for option, row in modules.items()}
    times = {option: {name: statistics.median(v) for name, v in row.items()} for option, row in samples.items()}
    for row in times.values():
        row["per token"] = 12 * sum(row[k] for k in list(shapes)[:4]) + row["lm_head"]
    return list(shapes) + ["per token"], times, warmup, error


# ---------------------------------------------------------------- quality

def text_data():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # no install holds it
    from corpus import english_prose
    text = english_prose(600_000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    return data[:split], data[split:], len(chars)


def batches(data, block, batch, generator):
    while True:
        i = torch.randint(0, len(data) - block - 1, (batch,), generator=generator)
        x = torch.stack([data[j:j + block + 1] for j in i.tolist()])
        yield x[:, :-1], x[:, 1:]


def train_char_model(train, vocab, steps, **kw):
    c = GPT.get_default_config()
    c.merge_from_dict(dict(n_layer=3, n_head=8, n_embd=128, vocab_size=vocab, block_size=128, **kw))
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = 0.0
    torch.manual_seed(0)
    model = GPT(c)
    opt = model.configure_optimizers(argparse.Namespace(learning_rate=3e-3, weight_decay=0.1, betas=(0.9, 0.99)))
    data = batches(train, 128, 16, torch.Generator().manual_seed(0))
    for step in range(steps):
        for group in opt.param_groups:  # linear decay to 10%
            group["lr"] = 3e-3 * (1 - 0.9 * step / steps)
        x, y = next(data)
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def val_stats(model, reference, val):
    """(mean val loss of model, fraction of positions whose argmax equals reference's) over all val windows."""
    x = val[:len(val) // 129 * 129].view(-1, 129)
    losses, agree, count = [], 0, 0
    for chunk in x.split(64):
        logits = model(chunk[:, :-1])[0]
        losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        agree += int((logits.argmax(-1) == reference(chunk[:, :-1])[0].argmax(-1)).sum())
        count += chunk[:, 1:].numel()
    return float(sum(losses)) / count, agree / count


def bench_quality(steps):
    train, val, vocab = text_data()
    rows = []
    for label, kw in (("vanilla", {}), ("circulant + token shift", dict(time_weighting="circulant", token_shift=True))):
        model = train_char_model(train, vocab, steps, **kw)
        fp32_loss, _ = val_stats(model, model, val)
        int8_loss, agreement = val_stats(model.quantize(), model, val)
        rows.append((label, fp32_loss, int8_loss, agreement))
    return rows


def adder_accuracy(work_dir):
    """(fp32 correct, int8 correct, test problems) of projects/adder's checkpoint in work_dir, on its test split."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    spec = importlib.util.spec_from_file_location("adder", os.path.join(root, "projects", "adder", "adder.py"))
    adder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adder)
    with open(os.path.join(work_dir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    config = adder.get_config()
    config.merge_from_dict({"system": saved["system"], "data": saved["data"]})
    test = adder.AdditionDataset(config.data, "test", seed=config.system.seed)
    model = GPT.from_checkpoint(os.path.join(work_dir, "checkpoint.pt"))
    return adder.count_correct(model, test), adder.count_correct(model.quantize(), test), len(test)


# ---------------------------------------------------------------- report

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adder", help="a work dir of projects/adder/adder.py: also measure its test accuracy")
    parser.add_argument("--compile-torchao", action="store_true",
                        help="also time torchao under torch.compile (minutes of compiling)")
    parser.add_argument("--only-kernels", action="store_true", help="only the table of int8 options")
    parser.add_argument("--only-where-it-pays", action="store_true",
                        help="only the int8/fp32 speed table, int8 everywhere and where it pays")
    parser.add_argument("--only-generation", action="store_true",
                        help="only cached generation at GPT-2's shape, int8 and fp32 against transformers")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(*args.rss_child)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), quantized engine "
          f"{torch.backends.quantized.engine}, CPU {cpu_description()}, load average {os.getloadavg()[0]:.2f}")
    if args.only_where_it_pays:
        return print_where_int8_pays(args.quick)
    if args.only_generation:
        return print_generation(2 if args.quick else 3)
    columns, times, warmup, error = bench_kernels(3 if args.quick else 7, 10, args.compile_torchao)
    print("\nint8 options at batch 1, GPT-2's Linear shapes: microseconds per call, median of interleaved rounds "
          "(per token: 12 blocks + head)")
    print("| option | " + " | ".join(columns) + " | vs fp32 per token | first calls (s) | max error / max output |")
    print("| --- " * (len(columns) + 4) + "|")
    for option, row in times.items():
        ratio = times["fp32 nn.Linear"]["per token"] / row["per token"]
        print(f"| {option} | " + " | ".join(f"{row[c]:.0f}" for c in columns) + f" | {ratio:.2f}x "
              f"| {warmup[option]:.2f} | {error[option]:.2g} |")
    if args.only_kernels:
        return
    print_where_int8_pays(args.quick)

    rounds = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        for shape, new_tokens in (("gpt2", 50 if args.quick else 100), ("seed", 100 if args.quick else 120)):
            gen, fwd, ceiling = bench_speed(shape, rounds, new_tokens)
            fp32_size, int8_size, int8_path = file_sizes(shape, tmp)
            rss = {name: peak_rss(shape, name, int8_path) for name in MODELS}
            print(f"\n{shape} shape {SHAPES[shape]}: median of {rounds} interleaved rounds")
            print("| model | cached generation, batch 1 (tokens/s) | forward, batch 32 x 128 (tokens/s) | peak RSS (MiB) |")
            print("| --- | --- | --- | --- |")
            for name in MODELS:
                print(f"| {name} | {gen[name]:.1f} | {fwd[name]:.0f} | {rss[name]} |")
            for name in ("mygpt fp32", "mygpt int8"):
                print(f"| {name}, Linear layers only | {ceiling[name]:.1f} | | |")
            print(f"int8 generation: {gen['mygpt int8'] / gen['transformers fp32']:.2f}x transformers fp32 (target 2x), "
                  f"{gen['mygpt int8'] / gen['mygpt fp32']:.2f}x mygpt fp32 (target 1.5x); "
                  f"forward {fwd['mygpt int8'] / fwd['mygpt fp32']:.2f}x mygpt fp32")
            print(f"file: fp32 {fp32_size / 2**20:.1f} MiB, int8 {int8_size / 2**20:.1f} MiB "
                  f"({fp32_size / int8_size:.2f}x smaller, target 3.5x)")

    steps = 150 if args.quick else 600
    print(f"\nquality: character model, 3 layers, 8 heads, 128 wide, block 128, {steps} steps on Python's help topics")
    print("| attention | val loss fp32 | val loss int8 | increase | next-token agreement |")
    print("| --- | --- | --- | --- | --- |")
    for label, fp32_loss, int8_loss, agreement in bench_quality(steps):
        print(f"| {label} | {fp32_loss:.4f} | {int8_loss:.4f} | {100 * (int8_loss / fp32_loss - 1):+.2f}% "
              f"| {100 * agreement:.2f}% |")

    if args.adder:
        fp32_correct, int8_correct, total = adder_accuracy(args.adder)
        print(f"\nadder test accuracy: fp32 {fp32_correct}/{total} = {100 * fp32_correct / total:.2f}%, "
              f"int8 {int8_correct}/{total} = {100 * int8_correct / total:.2f}%")


if __name__ == "__main__":
    main()
