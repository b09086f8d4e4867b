"""
Which precision a training run computes in: `precision='auto'` picks bf16 autocast only where it is native and faster.

bf16 halves the bytes of every matrix product and, where the hardware multiplies bf16 natively (CUDA devices that
support it; x86 CPUs with AMX or AVX512-BF16), runs 1.5-3x faster. Elsewhere it is emulated and slower (about 160x on
an AVX2-only CPU), and even on a bf16 CPU a small model can lose more to autocast's casts than it gains. So 'auto':

  1. no native bf16 here: fp32;
  2. a model of fewer than _PROBE_MIN_PARAMS parameters: fp32, without a probe (whose timings, of steps this
     short, a busy machine can tip either way: the choice stays the same from run to run);
  3. otherwise a probe: a few forward/backward passes of the run's own model on its first batch, timed in fp32 and
     in bf16 autocast alternately; bf16 only if its best time beats fp32's by a margin (_PROBE_MARGIN).

The probe changes no weight (its gradients are dropped) and runs before the Trainer seeds its RNGs. The choice is
recorded in the checkpoints, and a resumed run takes it from there instead of probing again. fp16 is never chosen
automatically (it needs a grad scaler and overflows where bf16 does not).
"""

import time
from contextlib import nullcontext

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # each name's autocast dtype (None: none)
_PROBE_MARGIN = 1.1  # bf16 must be at least 10% faster: a tie is not worth its rounding
_PROBE_ROUNDS = 3
# Below this many parameters bf16 does not pay: autocast's casts and per-operation costs outweigh what the smaller
# products save. Training one thread of an AMD EPYC with AVX512-BF16: 2 x 32 wide (27k parameters, block 16,
# batch 8) ran at 0.63x fp32's speed in bf16, 3 x 48 (89k, block 64, batch 12) at 1.20x, 4 x 128 (0.8M) at 1.55x.
_PROBE_MIN_PARAMS = 50_000


def _cpu_flags():
    """The feature flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native(device_type, dtype):
    """Whether device_type multiplies dtype (torch.bfloat16 or torch.float16) natively, without emulation."""
    if device_type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        wanted = {torch.bfloat16: {"amx_bf16", "avx512_bf16"}, torch.float16: {"amx_fp16", "avx512_fp16"}}[dtype]
        return bool(_cpu_flags() & wanted)
    return False


def autocast(device_type, dtype):
    """The context computing in dtype, autocast's torch.bfloat16 or torch.float16, on device_type; None: fp32."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _probe(step, rounds=_PROBE_ROUNDS):
    """(fp32 seconds, bf16 seconds): the best of `rounds` timings of step(dtype or None), alternating."""
    best = {None: float("inf"), torch.bfloat16: float("inf")}
    for dtype in best:  # warm-up: the first call of each pays for kernels and allocations
        step(dtype)
    for _ in range(rounds):
        for dtype in best:
            start = time.perf_counter()
            step(dtype)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[None], best[torch.bfloat16]


def choose(device_type, step, params=None):
    """('fp32' or 'bf16', why): see the module's docstring. step(dtype) runs one pass of the work to be timed: a
    training step's forward and backward, or an evaluation's forward (mygpt.evaluate); params: the model's size,
    for the size rule (None: none; mygpt.inference has its own, on the weight matrices)."""
    if not native(device_type, torch.bfloat16):
        return "fp32", f"this {device_type} has no native bf16"
    if params is not None and params < _PROBE_MIN_PARAMS:
        return "fp32", f"a model of {params:,} parameters is too small for bf16 to pay (under {_PROBE_MIN_PARAMS:,})"
    fp32, bf16 = _probe(step)
    if fp32 >= _PROBE_MARGIN * bf16:
        return "bf16", f"bf16 autocast ran a step {fp32 / bf16:.2f}x as fast as fp32 on this model"
    return "fp32", f"bf16 autocast was not faster on this model ({fp32 / bf16:.2f}x fp32's speed)"
