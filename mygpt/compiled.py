"""
torch.compile with a way back: when compiling fails, one line says why and the work goes on in eager mode.

torch.compile compiles lazily, inside the first call (and again when shapes or guards change), so a failure
(no C compiler for inductor, an operator it cannot trace or lower, like the int8 model's quantized kernels)
comes out of an ordinary call as an exception whose message runs to hundreds of lines. Compiled.run catches
the compile stack's exceptions only (torch._dynamo's TorchDynamoException: a user error raised inside the
model keeps its own type and passes through), puts the RNG states back as they were before the call (a
function with graph breaks may have run part of the model, drawing dropout masks, before a later piece
failed to compile), reports the cause in one line, and makes the same call again in eager mode, as every
later call is.
"""

import logging
import os
import re

import torch

_BACKEND = "inductor"  # what compile=True compiles with (on a CPU: C++ built by the machine's C compiler)
_MAX_CAUSE = 200  # characters of the cause in the warning


class Compiled:
    """fn compiled by torch.compile, until a compile fails; from then on fn itself (eager mode).

    what names fn in the warning; warn prints it (default: the 'mygpt' logger, which prints one line to stderr
    when nothing else is set up); on_failure() is called after the switch, for a caller that wraps fn further.
    options go to torch.compile.
    """

    def __init__(self, fn, what, warn=None, on_failure=None, **options):
        self.eager, self.what = fn, what
        self.warn = warn or logging.getLogger("mygpt").warning
        self.on_failure = on_failure
        self.fn = torch.compile(fn, backend=_BACKEND, **options)
        self.failure = None  # the one-line cause, once a compile has failed

    def __call__(self, *args, **kwargs):
        return self.run(lambda: self.fn(*args, **kwargs))

    def run(self, call, *args, **kwargs):
        """call(*args, **kwargs), a function that calls self.fn (directly or through a wrapper); when that fails
        to compile: say so, switch self.fn to eager mode, put the RNG states back and call again."""
        if self.failure is not None:
            return call(*args, **kwargs)
        states = _rng_states()
        try:
            return call(*args, **kwargs)
        except Exception as error:
            # imported here, not with mygpt: torch._dynamo is a heavy import (Triton with it) that eager mode never needs
            from torch._dynamo.exc import TorchDynamoException
            if not isinstance(error, TorchDynamoException):
                raise
            self.failure = _cause(error)
        self.warn(f"warning: torch.compile could not compile {self.what} ({self.failure}); running it in eager mode")
        self.fn = self.eager
        if self.on_failure is not None:
            self.on_failure()
        _set_rng_states(states)
        return call(*args, **kwargs)


def _cause(error):
    """A compile failure in one line: the innermost error's type and first line, and where in the traced code."""
    inner = error
    while getattr(inner, "inner_exception", None) is not None:  # a backend's error, wrapped by dynamo
        inner = inner.inner_exception
    text = str(error)
    first = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    line = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)  # the traced code's frames, innermost last
    if frames:
        line += f", at {os.path.basename(frames[-1][0])}:{frames[-1][1]}"
    return line if len(line) <= _MAX_CAUSE else line[:_MAX_CAUSE - 3] + "..."


def _rng_states():
    """The states of the RNGs a model's dropout draws from (the CPU's and, once initialised, every GPU's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_states(states):
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
