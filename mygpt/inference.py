"""
Which precision a trained model computes in for inference (`mygpt sample` and `mygpt eval --precision`).

'fp32', 'bf16' or 'auto'. bf16 is bf16 autocast, as in the Trainer; inside precision_context('bf16')
mygpt.model.Linear keeps a bf16 copy of its weights (cast once, not at every call), so that decoding reads 2 bytes
a weight instead of 4, and the rest runs as autocast runs it (norms and losses in fp32). mygpt eval --data scores
with mygpt.score, which chooses 'auto' by this rule too and casts the weights once (the Trainer's evaluations, whose
weights change between them, cast at every call). 'auto' takes bf16 only
where the device computes it natively and it pays on this model: never where every weight matrix is small (below
mygpt.matvec.MIN_WEIGHTS, where the weights sit in cache and bf16 adds only casts), elsewhere as
mygpt.precision.choose times the caller's own work (a few decoding steps, or a forward) both ways. The choice is
logged once. An int8 model (mygpt.quantize) computes in its own kernels, in fp32 around them: 'auto' is fp32
there, and 'bf16' is refused.

    precision = inference_precision(model, "auto", step)   # step(dtype): the work to time, in autocast(dtype)
    with precision_context(precision):
        tokens = model.generate(idx, 100)
"""

import itertools
import logging
from contextlib import contextmanager

import torch

from mygpt import precision as _precision
from mygpt.matvec import MIN_WEIGHTS
from mygpt.model import Linear, bf16_weight_copies
from mygpt.quantize import is_quantized

INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")

_log = logging.getLogger("mygpt")


def precision_context(precision, device_type="cpu"):
    """The context that runs a model for inference in precision ('fp32' or 'bf16') on device_type: bf16 autocast
    with each large Linear's weights cast to bf16 once (model.bf16_weight_copies; they must not change inside),
    or nothing."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' here, got {precision!r}")
    return _in_precision(precision == "bf16", device_type)


@contextmanager
def _in_precision(bf16, device_type):
    with _precision.autocast(device_type, torch.bfloat16 if bf16 else None), bf16_weight_copies():
        yield


def inference_precision(model, precision, step, note=None):
    """'fp32' or 'bf16' for running model: precision itself, or for 'auto' the faster where bf16 is native, timed
    by step(dtype) (one pass of the work, in bf16 autocast when dtype is torch.bfloat16; see precision.choose).

    Every choice of 'auto' is logged (the 'mygpt' logger, INFO); a timed one, which may differ between machines
    and runs, is also told to note(text) when given (the CLI prints it)."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {list(INFERENCE_PRECISIONS)}, got {precision!r}")
    device_type = next(itertools.chain(model.parameters(), model.buffers())).device.type
    if is_quantized(model):
        if precision == "bf16":
            raise ValueError("precision 'bf16' is for fp32 models: an int8 model computes in its own kernels; "
                             "use 'fp32' or 'auto'")
        if precision == "auto":
            _log.info("precision='auto': fp32 (an int8 model computes in its own kernels)")
        return "fp32"
    if precision == "bf16" and not _precision.native(device_type, torch.bfloat16):
        _log.warning(f"warning: this {device_type} has no native bf16: bf16 is emulated, many times slower than "
                     f"fp32 (precision 'auto' takes fp32 here)")
    if precision != "auto":
        return precision
    if not any(isinstance(m, Linear) and m.weight.numel() >= MIN_WEIGHTS for m in model.modules()):
        _log.info("precision='auto': fp32 (every weight matrix is small: bf16 would add casts and save no reads)")
        return "fp32"
    with torch.inference_mode(), bf16_weight_copies():  # cast once for all the timed steps, as for the run
        choice, why = _precision.choose(device_type, step)
    text = f"precision='auto': {choice} ({why})"
    _log.info(text)
    if note is not None:
        note(text)
    return choice
