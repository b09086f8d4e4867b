"""
Decoding's matrix-vector products at the speed of memory: mygpt/matvec.cpp, built for this machine.

Decoding one token multiplies every weight matrix by one vector, a single pass over the weights. The libraries
behind F.linear do not reach memory's speed there on the CPU. GPT-2 124M's products of one step (AMD EPYC, one
thread, load 3.5 from other work, the fastest of 5 interleaved rounds): oneDNN in fp32 30 ms, where a plain sum
over the same weights takes 18; oneDNN in bf16, its weights laid out once in its own blocked layout, 28 ms,
where a sum of the bf16 weights takes 13. A loop compiled by torch.compile reached 22 ms in fp32 but stalled in
bf16 and int8: inductor sums a row into one vector, each addition waiting for the last, so converting each weight
to fp32 bounded it at 12 G weights/s. matvec.cpp keeps four sums apart and multiplies in the CPU's own bf16 and
int8 dot products where it has them (AVX512-BF16, AVX512-VNNI; AVX2's int8 pairs elsewhere), as llama.cpp does.

It is built at first use with inductor's C++ toolchain (the compiler and -march=native flags of torch.compile's
own kernels; about 3 s once, then from inductor's cache on disk) and called directly, 2-4 µs a call where a
torch.compile'd function pays ~30 µs in guards and wrappers. Where building fails (no C++ compiler) the warning
says so once and `pays()` turns False: the callers go back to their library kernels.

Weights: fp32, bf16 (x rounded to bf16 first, as bf16 autocast rounds a Linear's input) or int8 times a scale per
row, with x in fp32 or, quantize_x=True, quantized in blocks of 32 as llama.cpp's q8_0 does (int32 sums).
"""

import os
import warnings

import torch

# below this many weights a call's overhead outweighs what it saves, and the weights sit in cache anyway
MIN_WEIGHTS = 1 << 17

_HERE = os.path.dirname(os.path.abspath(__file__))
_ARGS = ["const void*", "const float*", "const float*", "const float*", "float*",
         "const int64_t", "const int64_t", "const int64_t", "const int64_t"]
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
QUANTIZED_X = 3  # int8 weights times x in int8 (matvec.cpp's kinds)


class Kernel:
    """A C++ function `kernel` taking argtypes, built from these files of mygpt/ (joined, after `prefix`) at its
    first use: building costs nothing until a call needs it. mygpt/decode.py builds one with matvec.cpp in it."""

    def __init__(self, files, argtypes, what, prefix=""):
        self.files, self.argtypes, self.what, self.prefix = files, argtypes, what, prefix
        self.fn = None
        self.failed = False

    def get(self):
        """The built kernel, or None where building failed (said once)."""
        if self.fn is None and not self.failed:
            try:
                from torch._inductor.codecache import CppPythonBindingsCodeCache
                source = self.prefix
                for name in self.files:
                    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
                        source += f.read()
                self.fn = CppPythonBindingsCodeCache.load_pybinding(self.argtypes, source)
            except Exception as e:  # no compiler, or a torch whose inductor builds differently
                self.failed = True
                cause = str(e).strip().splitlines()
                warnings.warn(f"mygpt could not build {os.path.basename(self.files[-1])} ({type(e).__name__}: "
                              f"{cause[-1] if cause else ''}); {self.what}", RuntimeWarning)
        return self.fn


_KERNEL = Kernel(["matvec.cpp"], _ARGS, "decoding uses torch's kernels, slower at one row")
_ZEROS = {}  # out -> zeros(out): the bias of a layer without one


def build():
    """Build the kernel now, if not yet (otherwise the first product does): for callers about to time products.
    Whether it is available."""
    return _KERNEL.get() is not None


def pays(weight, x):
    """Whether matvec should multiply x (..., in) by weight (out, in) here: enough weights, no autograd, on the
    CPU, and one_row."""
    return weight.numel() >= MIN_WEIGHTS and not torch.is_grad_enabled() and x.is_cpu and one_row(weight, x)


def one_row(weight, x):
    """The part of pays() for a caller that has checked the rest (mygpt.model.Linear): x holds one row, outside a
    compiled graph, and building the kernel has not failed in this process."""
    return x.numel() == weight.shape[1] and not torch.compiler.is_compiling() and not _KERNEL.failed


def kind_of(weight, quantize_x):
    """matvec.cpp's kind for these weights (fp32, bf16, int8) and x (quantize_x: int8 blocks, int8 weights only)."""
    return QUANTIZED_X if quantize_x else _KINDS[weight.dtype]


def matvec(weight, x, scale=None, bias=None, quantize_x=False):
    """weight (out, in) [* scale (out,)] @ x + bias: x (..., in) holding one row, out (..., out) fp32.

    weight fp32, bf16 or int8 (int8 with its scale, fp32 (out,)); bias fp32 or None; sums in fp32.
    quantize_x: int8 weights times x quantized to int8 in blocks of 32 (see the module's docstring).
    Written for a call a layer per token: no views (a view costs ~1 µs in inference mode), the output allocated in
    its final shape."""
    out, n_in = weight.shape
    if (weight.dtype == torch.int8) != (scale is not None) or (quantize_x and scale is None):
        raise ValueError("int8 weights take a scale (out,), and only they do (quantize_x is for int8 weights)")
    kind = kind_of(weight, quantize_x)
    if bias is None:
        bias = _ZEROS.get(out)
        if bias is None:
            bias = _ZEROS[out] = torch.zeros(out)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    kernel = _KERNEL.get()
    if kernel is None:  # this call only: pays() is False from now on
        w = weight.float() if scale is None else weight.float() * scale[:, None]
        return (x.bfloat16().float() if kind == 1 else x) @ w.T + bias
    y = torch.empty(*x.shape[:-1], out)  # ints, not a shape: a third of the time
    kernel(weight.contiguous(), x, bias if scale is None else scale.contiguous(), bias.contiguous(), y, kind, out,
           n_in, torch.get_num_threads())
    return y
