"""The machine a benchmark ran on, in the words its figures are labelled with (the benchmarks import it)."""

import os

_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))  # what fp32, int8 and bf16 kernels choose by


def cpu_description():
    """The CPU's name, the vector extensions that matter here, and its cores (Linux's /proc/cpuinfo)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            # one "key : value" line per field and core; the cores are alike
            info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in f if ":" in line)}
        name, flags = info.get("model name", name), set(info.get("flags", "").split())
    except OSError:
        pass
    features = [label for flag, label in _FEATURES if flag in flags] or ["no AVX2"]
    return f"{name} ({', '.join(features)}), {os.cpu_count()} cores"
