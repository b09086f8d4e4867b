"""
mygpt on a GPU, checked and measured in one run: for a bare CUDA machine with PyTorch and Triton, no installs.

    PYTHONPATH=. python bench/gpu.py gpu.json                   # under 8 minutes on one H100
    PYTHONPATH=. python bench/gpu.py --cpu-smoke smoke.json     # every code path, tiny shapes, on the CPU

1. Tests on CUDA. The Triton kernel (mygpt.kernels) against the PyTorch path at GPT-2 shape, forward and
   backward, both time-weighting forms: in bf16 each output's error against an fp32 reference must stay
   within 2x that of the PyTorch path in bf16 (or 1% of the largest value); in fp32 at odd T, within 1e-4
   relative. Cached generation equals uncached. bf16 + torch.compile training steps through the Trainer
   lower the loss.
2. Attention alone at GPT-2 shape (batch 16, T 1024, 12 heads of 64, bf16): forward + backward time and
   peak memory of flash attention (SDPA), the time-weighted PyTorch path and the kernel.
3. Training at GPT-2 124M shape (block 1024, batch 16, vocab 50304, no dropout, bf16 autocast,
   torch.compile, fused AdamW, grad clipping): tokens/s, MFU and peak memory of mygpt vanilla, a
   nanoGPT-style reference written below, mygpt circulant with the PyTorch path and with the kernel,
   then, time allowing, mygpt full both ways. MFU is nanoGPT's estimate_mfu: (6 N + 12 L C T) FLOPs per
   token (N without position embeddings, the same count for every model) over the GPU's dense bf16 peak.
4. One table, and all of it as JSON at the path given.

Each check and measurement reports its own failure and the run goes on; a time budget (--budget) skips
what would not fit. Targets (printed with the table): vanilla >= the reference's tokens/s; circulant with
the kernel >= 0.8x vanilla's tokens/s with peak memory <= 1.2x vanilla's.
"""

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("json_path", help="where to write the results as JSON")
parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
parser.add_argument("--budget", type=float, default=420.0,
                    help="seconds for the run; a training measurement starts only with 75 s of them left")
args = parser.parse_args()
if args.cpu_smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

from mygpt import GPT, Trainer
# the attention kernel and the PyTorch path it replaces, timed alone: the model chooses between them for a user
from mygpt.kernels import time_weighted_attention
from mygpt.model import CausalSelfAttention, circulant_time_weighting

START = time.time()
SMOKE = args.cpu_smoke
if not SMOKE and not torch.cuda.is_available():
    parser.error("no CUDA device here; --cpu-smoke runs every code path on the CPU")
DEVICE = "cpu" if SMOKE else "cuda"
AMP = None if SMOKE else torch.bfloat16  # the interpreter cannot multiply bf16 (see mygpt/kernels)
COMPILE_BACKEND = "aot_eager" if SMOKE else "inductor"  # aot_eager: the compile path without building C++
GPT2 = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32) if SMOKE else \
    dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
BATCH = 2 if SMOKE else 16
WARMUP, STEPS = (1, 1) if SMOKE else (3, 10)
SECONDS_PER_MODEL = 0 if SMOKE else 75  # compile + measure, to decide what still fits the budget
# dense bf16 tensor-core FLOP/s by device name, the first match wins
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]
results = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
           "tests": {}, "attention": {}, "training": {}, "skipped": []}


def remaining():
    return args.budget - (time.time() - START)


def section(kind, name, fn):
    """Run fn, record its result (or the failure) under results[kind][name], and go on either way."""
    t0 = time.time()
    try:
        out = fn()
    except Exception as e:  # a failure is a result to report, not a reason to stop
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
    out["seconds"] = round(time.time() - t0, 1)
    results[kind][name] = out
    print(f"[{time.time() - START:5.0f}s] {kind}/{name}: {json.dumps({k: v for k, v in out.items() if k != 'trace'})}",
          flush=True)
    if DEVICE == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# 1. tests

def attention_formula(q, k, v, W):
    """softmax(q k^T / sqrt(d) + causal mask) * W @ v, as written."""
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) * W) @ v


def time_params(form, nh, block_size):
    torch.manual_seed(1)
    if form == "full":
        params = {"time_weighting": 1 + 0.1 * torch.randn(nh, block_size, block_size, device=DEVICE)}
    else:
        params = {"time_weight": 1 + 0.1 * torch.randn(nh, block_size, device=DEVICE),
                  "time_bias": 1 + 0.1 * torch.randn(nh, 1, block_size, device=DEVICE)}
    return {name: p.requires_grad_() for name, p in params.items()}


def weights(params, T):
    if "time_weighting" in params:
        return params["time_weighting"][:, :T, :T]
    return circulant_time_weighting(params["time_weight"], params["time_bias"], T)


def outputs_and_grads(fn, q, k, v, params, dy):
    """fn's output and the gradients of q, k, v and the time parameters for output gradient dy."""
    inputs = [q, k, v, *params.values()]
    y = fn(*inputs)
    return [y, *torch.autograd.grad(y, inputs, dy.to(y.dtype))]


def kernel_against_pytorch(form, B, T, dtype):
    """Max relative error against an fp32 reference of the kernel and (for 16-bit) the PyTorch path."""
    nh, hs = GPT2["n_head"], GPT2["n_embd"] // GPT2["n_head"]
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3, nh, hs, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    dy = torch.randn(B, nh, T, hs, device=DEVICE)
    params = time_params(form, nh, max(T, GPT2["block_size"]))
    names = ["y", "q", "k", "v", *params]

    def run(fn, dtype, autocast=False):
        q_, k_, v_ = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
        with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):  # as the model runs in bf16
            return outputs_and_grads(fn, q_, k_, v_, params, dy)

    def torch_path(q, k, v, *p):
        return attention_formula(q, k, v, weights(dict(zip(params, p)), T))

    def kernel(q, k, v, *p):
        return time_weighted_attention(q, k, v, **dict(zip(params, p)))

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact fp32 reference
    try:
        reference = run(torch_path, torch.float32)
        got = run(kernel, dtype)
        pytorch = run(torch_path, dtype, autocast=True) if dtype != torch.float32 else None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32

    def rel(x, ref):
        return (x.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)

    out = {"kernel_error": {n: rel(g, r) for n, g, r in zip(names, got, reference)}}
    if pytorch is None:
        out["ok"] = all(e < 1e-4 for e in out["kernel_error"].values())
    else:
        out["pytorch_error"] = {n: rel(g, r) for n, g, r in zip(names, pytorch, reference)}
        out["ok"] = all(out["kernel_error"][n] <= max(2 * out["pytorch_error"][n], 1e-2) for n in names)
    return out


def small_gpt(time_weighting, attention="auto", block_size=32, vocab_size=100):
    config = GPT.get_default_config()
    config.merge_from_dict(dict(model_type="gpt-mini", vocab_size=vocab_size, block_size=block_size,
                                time_weighting=time_weighting, attention=attention,
                                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(DEVICE)


def cached_equals_uncached():
    # exact fp32 (no TF32), so that rounding cannot swap two nearly equal logits between the two paths
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return generations()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def generations():
    out = {}
    prompt = torch.randint(0, 100, (2, 10), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    for form in (None, "circulant", "full"):
        model = small_gpt(form).eval()
        new = 8 if SMOKE else 40  # past block_size 32 on the GPU: the window slides too
        cached = model.generate(prompt, max_new_tokens=new, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=new, use_cache=False)
        out[str(form)] = bool(torch.equal(cached, uncached))
    out["ok"] = all(out.values())
    return out


class Rule(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable in a few steps."""

    def __init__(self, n, block_size, vocab_size):
        self.data = (torch.randint(0, vocab_size, (n, 1)) + torch.arange(block_size + 1)) % vocab_size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def bf16_compiled_training():
    model = small_gpt("circulant", block_size=128, vocab_size=64)  # 'auto': the kernel on CUDA
    config = Trainer.get_default_config()
    config.merge_from_dict(dict(device=DEVICE, max_iters=4 if SMOKE else 60, batch_size=8 if SMOKE else 32,
                                learning_rate=1e-3, precision="fp32" if SMOKE else "bf16", compile=not SMOKE,
                                quiet=True, log_interval=0))
    torch.manual_seed(0)
    trainer = Trainer(config, model, Rule(256, 128, 64))
    trainer.run()
    losses = [h["loss"] for h in trainer.history if h["loss"] is not None]
    first, last = losses[0], losses[-1]
    ok = math.isfinite(last) and abs(first - math.log(64)) < 0.5 and (SMOKE or last < 1.0)
    return {"ok": ok, "first_loss": first, "last_loss": last, "steps": len(losses)}


# ---------------------------------------------------------------------------------------------------------------
# 2. attention alone

def attention_alone():
    B, nh, T, hs = BATCH, GPT2["n_head"], GPT2["block_size"], GPT2["n_embd"] // GPT2["n_head"]
    dtype = torch.float32 if SMOKE else torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, nh, T, hs, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    config = GPT.get_default_config()
    config.merge_from_dict(dict(GPT2, time_weighting="circulant", attn_pdrop=0.0))
    module = CausalSelfAttention(config, 0).to(DEVICE)  # its attend() is mygpt's PyTorch path
    circulant = {"time_weight": module.time_weight, "time_bias": module.time_bias}
    variants = {
        "flash (SDPA, no time weighting)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "circulant, PyTorch path": lambda: module.attend(q, k, v, module.weights(T).to(dtype)),
        "circulant, Triton kernel": lambda: time_weighted_attention(q, k, v, **circulant),
        "no weights, Triton kernel": lambda: time_weighted_attention(q, k, v),
    }
    out = {"shape": [B, nh, T, hs], "dtype": str(dtype)}
    for name, fn in variants.items():
        for i in range(WARMUP + STEPS):
            if i == WARMUP:
                sync()
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
                t0 = time.perf_counter()
            fn().sum().backward()
        sync()
        out[name] = {"ms": 1e3 * (time.perf_counter() - t0) / STEPS,
                     "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if DEVICE == "cuda" else None}
    out["ok"] = True
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. training: the nanoGPT-style reference (nanoGPT's model.py, as its training script runs it)

class RefAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = RefAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, vocab_size, block_size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(RefBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight") \
                    else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self):
        params = list(self.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=DEVICE == "cuda")


def mygpt_model(time_weighting=None, attention="auto"):
    config = GPT.get_default_config()
    config.merge_from_dict(dict(GPT2, time_weighting=time_weighting, attention=attention,
                                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    model = GPT(config).to(DEVICE)
    train_config = Trainer.get_default_config()
    train_config.merge_from_dict(dict(learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95)))
    return model, model.configure_optimizers(train_config)


def reference_model():
    model = RefGPT(**GPT2).to(DEVICE)
    return model, model.configure_optimizers()


def flops_per_token():
    """nanoGPT's estimate: 6 N + 12 L C T, N the parameters without position embeddings."""
    L, C, T, V = GPT2["n_layer"], GPT2["n_embd"], GPT2["block_size"], GPT2["vocab_size"]
    n = V * C + L * (12 * C * C + 13 * C) + 2 * C  # tied embedding, blocks (weights, biases, LayerNorms), ln_f
    return 6 * n + 12 * L * C * T


def peak_flops():
    name = results["device"]
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def training(build):
    torch._dynamo.reset()  # a fresh compile per model, and the last model's graphs let go
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, optimizer = build()
    model.train()
    forward = torch.compile(model, backend=COMPILE_BACKEND)
    x = torch.randint(0, GPT2["vocab_size"], (BATCH, GPT2["block_size"]), device=DEVICE)
    y = torch.roll(x, -1, dims=1)

    def step():
        with torch.autocast(DEVICE, dtype=AMP, enabled=AMP is not None):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(WARMUP):
        loss = step()
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loss = step()
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = BATCH * GPT2["block_size"] * STEPS / seconds
    peak = peak_flops()
    return {"ok": math.isfinite(loss.item()), "tokens_per_s": tokens_per_s, "ms_per_step": 1e3 * seconds / STEPS,
            "mfu": tokens_per_s * flops_per_token() / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
            "warmup_and_compile_s": compile_s, "loss": loss.item()}


MODELS = {  # in order of importance: later ones are skipped first when time runs short
    "mygpt vanilla (flash)": lambda: mygpt_model(),
    "nanoGPT-style reference": reference_model,
    "mygpt circulant, Triton kernel": lambda: mygpt_model("circulant", "triton"),
    "mygpt circulant, PyTorch path": lambda: mygpt_model("circulant", "torch"),
    "mygpt full, Triton kernel": lambda: mygpt_model("full", "triton"),
    "mygpt full, PyTorch path": lambda: mygpt_model("full", "torch"),
}


# ---------------------------------------------------------------------------------------------------------------
# 4. the table

def report():
    lines = [f"device: {results['device']}   torch {results['torch']}   "
             f"(batch {BATCH} x block {GPT2['block_size']}, {GPT2['n_layer']} layers, {GPT2['n_embd']} wide)", ""]
    lines.append("tests:")
    for name, out in results["tests"].items():
        lines.append(f"  {'PASS' if out.get('ok') else 'FAIL'}  {name}" + (f"  ({out['error']})" if "error" in out else ""))
    attention = results["attention"].get("GPT-2 shape", {})
    if any(isinstance(v, dict) for v in attention.values()):
        lines += ["", f"attention alone, forward + backward, {attention.get('dtype')} {attention.get('shape')}:"]
        for name, out in attention.items():
            if isinstance(out, dict):
                mib = f"{out['peak_mib']:8.0f} MiB" if out["peak_mib"] is not None else ""
                lines.append(f"  {name:34s} {out['ms']:8.2f} ms {mib}")
    vanilla = results["training"].get("mygpt vanilla (flash)", {})
    lines += ["", f"{'training':34s} {'tokens/s':>10s} {'x vanilla':>9s} {'MFU':>6s} {'peak GiB':>9s} {'x vanilla':>9s}"]
    for name, out in results["training"].items():
        if "tokens_per_s" not in out:
            lines.append(f"{name:34s} FAILED: {out.get('error')}")
            continue
        speed = out["tokens_per_s"] / vanilla["tokens_per_s"] if "tokens_per_s" in vanilla else float("nan")
        memory = out["peak_gib"] / vanilla["peak_gib"] if out["peak_gib"] and vanilla.get("peak_gib") else float("nan")
        mfu = f"{100 * out['mfu']:5.1f}%" if out["mfu"] is not None else "   n/a"
        gib = f"{out['peak_gib']:9.2f}" if out["peak_gib"] is not None else "      n/a"
        lines.append(f"{name:34s} {out['tokens_per_s']:10.0f} {speed:9.2f} {mfu:>6s} {gib} {memory:9.2f}")
    for name in results["skipped"]:
        lines.append(f"{name:34s} skipped: time budget")
    lines += ["", "targets:"] + [f"  {'met ' if met else 'MISSED' if met is False else 'n/a '}  {what}"
                                  for what, met in targets(vanilla)]
    return "\n".join(lines)


def targets(vanilla):
    def get(name, key):
        return results["training"].get(name, {}).get(key)
    ref, kernel = "nanoGPT-style reference", "mygpt circulant, Triton kernel"
    speed = vanilla.get("tokens_per_s")
    checks = [("vanilla tokens/s >= reference's", get(ref, "tokens_per_s"), lambda r: speed >= r),
              ("circulant kernel tokens/s >= 0.8x vanilla", get(kernel, "tokens_per_s"), lambda k: k >= 0.8 * speed),
              ("circulant kernel peak memory <= 1.2x vanilla", get(kernel, "peak_gib"),
               lambda m: m <= 1.2 * vanilla["peak_gib"])]
    out = [(what, None if value is None or speed is None or SMOKE else test(value)) for what, value, test in checks]
    kernel_tests = [v for k, v in results["tests"].items() if k.startswith("kernel")]
    out.append(("kernel within bf16 tolerance of the PyTorch path",
                all(t.get("ok") for t in kernel_tests) if kernel_tests else None))
    return out


def main():
    if not SMOKE:
        torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT and mygpt's Trainer on CUDA
        torch.backends.cudnn.allow_tf32 = True
    T = GPT2["block_size"]
    dtype16 = torch.float32 if SMOKE else torch.bfloat16
    for form in ("circulant", "full"):
        section("tests", f"kernel {form} {str(dtype16)[6:]} B=4 T={T}", lambda: kernel_against_pytorch(form, 4, T, dtype16))
        section("tests", f"kernel {form} float32 B=2 T={T - 13}", lambda: kernel_against_pytorch(form, 2, T - 13, torch.float32))
    section("tests", "cached generation == uncached", cached_equals_uncached)
    section("tests", "bf16 + compile training lowers the loss", bf16_compiled_training)
    section("attention", "GPT-2 shape", attention_alone)
    for name, build in MODELS.items():
        if remaining() < SECONDS_PER_MODEL:
            results["skipped"].append(name)
            continue
        section("training", name, lambda: training(build))
    results["flops_per_token"] = flops_per_token()
    results["peak_bf16_flops"] = peak_flops()
    results["seconds"] = round(time.time() - START, 1)
    table = report()
    results["table"] = table
    print("\n" + table)
    tmp = f"{args.json_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.json_path)
    print(f"\nwritten to {args.json_path} after {results['seconds']} s")


if __name__ == "__main__":
    main()
