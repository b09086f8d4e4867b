"""
Decoding's matrix-vector products at the speed of memory: one compiled loop over weights of any dtype.

Decoding one token multiplies every weight matrix by one vector, a single pass over the weights. The libraries
behind F.linear do not reach memory's speed there on the CPU. GPT-2 124M's products of one step (AMD EPYC, one
thread, load 3.5 from other work, the fastest of 5 interleaved rounds): oneDNN in fp32 30 ms, where a plain sum
over the same weights takes 18; oneDNN in bf16, its weights laid out once in its own blocked layout, 28 ms,
where a sum of the bf16 weights takes 13. Written as what it is, y[o] = sum_i w[o, i] x[i] with each weight
converted to fp32 as it is read, and compiled by inductor into one vectorised loop, the products took 22 ms in
fp32 and 12 in bf16. The same loop reads int8 weights (times one scale per row) for mygpt.quantize.

Compiled with dynamic shapes: one kernel for every matrix shape of a dtype (about 2.5 s the first time in a
process, less once inductor's cache holds it). Where compiling fails (no C compiler) the warning says so once
and `available()` turns False: the callers go back to their library kernels.
"""

import functools

import torch

from mygpt.compiled import Compiled

# below this many weights a call's overhead (~20 µs for the compiled function's guards) outweighs what it saves,
# and the weights sit in cache anyway
MIN_WEIGHTS = 1 << 17


def _product(weight, x, scale, bias):
    """weight (out, in) of any dtype, x (in,) fp32, scale (out,) fp32 or None, bias (out,) fp32 -> (out,) fp32."""
    y = (weight.float() * x).sum(1)  # inductor fuses the conversion into the reduction: no fp32 copy is made
    return (y if scale is None else y * scale) + bias


class _Kernel:
    def __init__(self):
        self.compiled = None   # made at first use: compiling costs nothing until a product needs it
        self.failed = False

    def __call__(self, weight, x, scale, bias):
        if torch.compiler.is_compiling():  # inside a compiled graph (compile=True decoding): inlined there
            return _product(weight, x, scale, bias)
        if self.compiled is None:
            self.compiled = Compiled(_product, "the matrix-vector product", on_failure=self.fail, dynamic=True)
        if torch.is_autocast_enabled("cpu"):  # one graph for every caller: dynamo compiles again for each state
            with torch.autocast("cpu", enabled=False):
                return self.compiled(weight, x, scale, bias)
        return self.compiled(weight, x, scale, bias)

    def fail(self):
        self.failed = True


_KERNEL = _Kernel()


@functools.lru_cache(maxsize=None)
def _zeros(n):
    """The bias of a layer without one: always a tensor, so that one graph serves both kinds of layer."""
    with torch.inference_mode(False):  # an ordinary tensor, as the biases are: dynamo compiles again for each kind
        return torch.zeros(n)


def pays(weight, x):
    """Whether matvec should multiply x (..., in) by weight (out, in) here: one row, enough weights, no autograd,
    on the CPU, outside a compiled graph, and the compiled product has not failed in this process."""
    return (x.numel() == weight.shape[1] and weight.numel() >= MIN_WEIGHTS and not torch.is_grad_enabled()
            and x.device.type == "cpu" and not torch.compiler.is_compiling() and not _KERNEL.failed)


def matvec(weight, x, scale=None, bias=None):
    """weight (out, in) [* scale (out,)] @ x + bias: x (..., in) holding one row, out (..., out) fp32.

    weight fp32, bf16 or int8, accumulated in fp32; scale and bias fp32 or None."""
    out = weight.shape[0]
    # detached: dynamo takes a Parameter's shape as fixed, and would compile again for each shape
    bias = _zeros(out) if bias is None else bias.detach()
    # at most 6 graphs: a weight dtype's, for a row from inference mode and for one from outside it
    y = _KERNEL(weight.detach(), x.reshape(-1).float(), scale, bias)
    return y.view(*x.shape[:-1], out)
