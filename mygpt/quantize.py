"""
int8 inference: every nn.Linear of a GPT holds int8 weights with one scale per output channel.

    w[o, i] ≈ q[o, i] * scale[o],   scale[o] = max_i |w[o, i]| / 127,   q = round(w / scale) in [-127, 127]

On the CPU the product runs in PyTorch's own int8 kernels (fbgemm through torch.ops.quantized.linear_dynamic):
each call quantizes its input to 8 bits with one scale, multiplies in int32 and rescales to fp32. At batch 1 a
decoder is limited by reading its weights from memory, and int8 weights are a quarter of fp32's bytes. Elsewhere
(a GPU, a build without those kernels) the weights are dequantized for an ordinary fp32 matmul.

int8 does not always pay: each int8 call costs about 15 µs before any arithmetic (quantizing the input,
rescaling the output), more than a whole fp32 product of a 128-wide layer at one row. Which kernel is faster
depends on the layer's shape, the rows of the call (one when decoding, thousands in a batched forward), the
rest of the model (which evicts the layer's weights from the caches between its calls) and the CPU. So
quantize(model) (layers="auto") measures instead of guessing: before the model's first forward of each size
class (rows rounded up to a power of 4), forward passes over the same input time both kernels in one Linear of
each shape (_measure), and from then on each Linear shape runs the faster one at that size, in this model and in
every model of the same architecture in the process. The fp32 kernel multiplies by the dequantized int8 weights
(the same weights in both kernels; the file stays int8). layers="all" runs the int8 kernel everywhere. The
choices are logged once each to the "mygpt" logger and kept in _CHOICES.

So within a process the choice for a size never changes once made, and a model's outputs are repeatable. Across
processes they may not be: where the two kernels take about as long, one process can choose int8 and another
fp32 for the same layer, and their outputs then differ by the int8 rounding of the activations (the quality
bounds in the README and tests). layers="all" gives the same numbers in every process.

Why a module of our own on those kernels: torch.ao.quantization.quantize_dynamic (the same kernels) is deprecated,
keeps its weights as quantized tensors (also deprecated) that only its own modules read, and gives activations
7 bits on every x86 CPU; torchao's int8 Linear is 2-6x slower than fp32 on this CPU unless the model is compiled
(see the README and bench/bench_quantize.py). Here the state dict holds plain tensors (int8 weights, fp32 scales,
biases) that any reader understands and that stay loadable if the kernels change; the packed form the kernels
want is rebuilt at first use.

The token embedding is quantized the same way (one scale per token) and, when tied, shares lm_head's int8
matrix. It is kept dequantized in memory as well, since a lookup is cheap and generation reads the model's
dtype from it. LayerNorms, biases, position embeddings and time weights stay fp32: they are small.

    qmodel = quantize(model)                    # a quantized copy; model itself is left as it was
    qmodel = quantize(model, layers="all")      # the int8 kernel in every Linear, even where fp32 is faster
    save_quantized(qmodel, "model-int8.pt")     # about 1/4 of the fp32 file
    qmodel = load_quantized("model-int8.pt")    # in eval mode; qmodel(idx), qmodel.generate(...) as usual
"""

import copy
import logging
import time
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from mygpt.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from mygpt.hugepages import in_huge_pages, move_to_huge_pages
from mygpt.matvec import build as build_matvec, matvec, pays as matvec_pays

FORMAT = "mygpt-int8"  # the "format" entry of a quantized checkpoint

# Without VNNI, the x86 kernels add pairs of 8-bit products in 16 bits, which 8-bit activations could
# saturate: there the activations get 7 bits (PyTorch's reduce_range). VNNI accumulates in 32 bits.
_REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()

LAYERS = ("auto", "all")  # quantize's choices: the int8 kernel where it is measured faster, or everywhere
# The timings of layers="auto", kept for the process. For each model architecture (the shapes of its Linear
# layers, so that every copy and reload of a model chooses alike): {(rows size class, threads): {(in_features,
# out_features): (int8, fp32) seconds a call}}.
_CHOICES = {}
_PROBE_SECONDS = 0.02  # what the timed calls of one measurement take at least, unless one pass took ten times that
_MIN_PASSES, _MAX_PASSES = 5, 100  # of each kernel in one measurement (see _measure)

_log = logging.getLogger("mygpt")


def _quantize_rows(weight):
    """(int8 q, fp32 scale) with weight[o] ≈ q[o] * scale[o]: symmetric, one scale per row (output channel)."""
    if weight.is_meta:  # a skeleton to load saved tensors into: shapes only, nothing to compute
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[0], device="meta")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _size_class(rows):
    """rows rounded up to a power of 4: calls of similar size share one measurement."""
    size = 1
    while size < rows:
        size *= 4
    return size


def _timed(kernel, x):
    """(kernel(x), the seconds it took)."""
    start = time.perf_counter()
    y = kernel(x)
    return y, time.perf_counter() - start


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 (out, in) and an fp32 scale per output channel. Inference only.

    choices: the timings of the model's architecture in _CHOICES, where each call runs whichever kernel they
    favour for its size (int8_pays); None: always the int8 kernel.
    """

    def __init__(self, weight, scale, bias=None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scale", scale)    # fp32 (out,)
        self.register_buffer("bias", bias)      # fp32 (out,) or None
        self.choices = None                     # set by _measure_kernels (layers="auto")
        self.measuring = None                   # "int8" or "fp32" while _measure() times that kernel
        self.seconds = []                       # and the seconds of each call then
        self.tied_weight = None                 # a head tied to the embedding: the embedding's dequantized_weight
        self._packed = None                     # the kernels' own layout, built at first use, never saved
        self._fp32 = None                       # the dequantized weights, built where the fp32 kernel runs

    @classmethod
    def from_linear(cls, linear):
        q, scale = _quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q, scale, bias)

    def dequantized_weight(self):
        return self.weight.float() * self.scale[:, None]

    def packed(self):
        """fbgemm's prepacked weights, or False where this build or device has no int8 kernels."""
        if self._packed is None:
            try:
                with warnings.catch_warnings():
                    # quantized tensors are deprecated as a user-facing type; here one only carries q and
                    # scale into the prepacking and is dropped at once
                    warnings.simplefilter("ignore")
                    zero_points = torch.zeros(self.out_features, dtype=torch.long)
                    qweight = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero_points, 0)
                    self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
            except (AttributeError, RuntimeError, NotImplementedError):
                self._packed = False
        return self._packed

    def fp32_weight(self):
        if self.tied_weight is not None:  # the same numbers, which the embedding keeps anyway
            return self.tied_weight()
        if self._fp32 is None:
            with torch.inference_mode(False):  # kept for later calls, which may track gradients (of the input)
                self._fp32 = in_huge_pages(self.dequantized_weight())
        return self._fp32

    def product(self, x, int8):
        """x times the weights by the int8 kernel (int8=True: x quantized to int8, int32 sums) or the fp32 one (the
        dequantized weights). One row (decoding) in mygpt.matvec's kernel for both, which reads the int8 weights
        with no fp32 copy (a quarter of fp32's bytes), x in int8 blocks of 32 as llama.cpp's q8_0 or in fp32.
        More rows: fbgemm's int8 kernel, x with one scale for the whole call; or F.linear (MKL), not the oneDNN
        op of mygpt.model.Linear (at one row oneDNN took 16 µs a call at 128x128 against MKL's 4, AMD EPYC)."""
        weight = self.weight
        if matvec_pays(weight, x):
            return matvec(weight, x, self.scale, self.bias, quantize_x=int8)
        if int8:
            return torch.ops.quantized.linear_dynamic(x, self.packed(), _REDUCE_RANGE)
        return F.linear(x, self.fp32_weight(), self.bias)

    def int8_product(self, x):
        return self.product(x, True)

    def fp32_product(self, x):
        return self.product(x, False)

    def int8_pays(self, rows):
        """Whether the int8 kernel was measured faster than the fp32 one for calls of `rows` rows in this model;
        None where nothing was measured (layers="all", or a size that no forward of the model has had)."""
        if self.choices is None:
            return None
        timings = self.choices.get((_size_class(rows), torch.get_num_threads()))
        if timings is None:
            return None
        int8, fp32 = timings[self.in_features, self.out_features]
        return int8 < fp32  # a tie keeps fp32: its rounding is the smaller

    def forward(self, x):
        if x.is_cpu and x.dtype == torch.float32 and self.weight.is_cpu and self.packed() is not False:
            if self.measuring is not None:
                y, seconds = _timed(self.int8_product if self.measuring == "int8" else self.fp32_product, x)
                self.seconds.append(seconds)
                return y
            # None: not measured, int8 as "all" does
            return self.product(x, self.int8_pays(x.numel() // self.in_features) is not False)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def one_row_operands(self):
        """(weight, scale, bias, quantize_x): what forward multiplies one row by, in matvec's terms (mygpt.decode)."""
        return self.weight, self.scale, self.bias, self.packed() is not False and self.int8_pays(1) is not False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = self._fp32 = None  # new weights: pack and dequantize again

    def extra_repr(self):
        kernel = "int8 kernel" if self.choices is None else "int8 or fp32 kernel, the faster"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8, {kernel}")


def _measure(model, idx):
    """{(in_features, out_features): (int8, fp32)}: the fastest call of each kernel for each Linear shape of the
    quantized model, in seconds, timed in place during forward passes over idx (B, T), in which the first layer
    of each shape runs int8 and fp32 alternately and every other layer int8.

    In place, since a layer of a model finds its weights where the rest of the model left the caches: in one
    decoding step of a 6 x 384 model a 384x384 layer took 69 µs in fp32 and 32 µs in int8, against 18.5 and
    18.7 µs called alone, where its weights stay in cache. One layer of each shape, so that at most one
    layer's fp32 weights of each shape exist at a time (a model quantized to fit in memory could not hold
    all of them).
    """
    layers = {}  # (in_features, out_features) -> the first Int8Linear of that shape
    for m in model.modules():
        if isinstance(m, Int8Linear):
            layers.setdefault((m.in_features, m.out_features), m)
    for layer in layers.values():
        layer.fp32_weight()  # made before the timing, dropped after it: where int8 wins, it would only take memory
    build_matvec()  # built before the timing too (seconds, once), not inside a timed call
    try:
        with torch.inference_mode():
            fastest = _timed_passes(model, idx, layers)
    finally:
        for layer in layers.values():
            layer.measuring, layer.seconds, layer._fp32 = None, [], None
    return {shape: (fastest[shape, "int8"], fastest[shape, "fp32"]) for shape in layers}


def _timed_passes(model, idx, layers):
    """{(shape, kernel): the fastest call}: forward passes over idx, one with each kernel in turn in `layers`.

    At least _MIN_PASSES of each, and until the timed calls have taken _PROBE_SECONDS: the first calls at a new
    size can take twice as long (until the allocator keeps memory of that size), and on a shared machine another
    process can take the core during any call (three passes chose fp32 for a layer where int8 was 1.6 times as
    fast). One pass each where those of the first two took ten times as long (a large model at many rows).
    """
    fastest, spent = {}, 0.0
    for passes in range(1, _MAX_PASSES + 1):
        for kernel in ("int8", "fp32"):
            for layer in layers.values():
                layer.measuring, layer.seconds = kernel, []
            model(idx)
            for shape, layer in layers.items():
                fastest[shape, kernel] = min([fastest.get((shape, kernel), float("inf")), *layer.seconds])
                spent += sum(layer.seconds)
        if (passes == 1 and spent >= 10 * _PROBE_SECONDS) or (passes >= _MIN_PASSES and spent >= _PROBE_SECONDS):
            break
    return fastest


class _KernelChoice:
    """The forward pre-hook of a model quantized with layers="auto": before the model's first forward of each
    size class (the rows of idx rounded up to a power of 4), _measure both kernels and log the choices.

    The forward passes that measure run this hook too; `measuring` lets them through. (A flag on a layer could
    not: lm_head may share its shape with a layer timed before it, e.g. c_fc where vocab_size is 4 x n_embd.)
    """

    def __init__(self, choices):
        self.choices = choices  # the architecture's timings in _CHOICES, which its Int8Linear layers read
        self.measuring = False

    def __call__(self, model, args, kwargs):
        idx = args[0] if args else kwargs["idx"]
        key = (_size_class(idx.numel()), torch.get_num_threads())
        if key in self.choices or self.measuring or not idx.is_cpu or model.lm_head.packed() is False:
            return
        self.measuring = True
        try:
            self.choices[key] = _measure(model, idx)
        finally:
            self.measuring = False
        for (i, o), (int8, fp32) in self.choices[key].items():
            _log.info(f"int8 Linear {i}x{o}, up to {key[0]} rows, {key[1]} threads: the "
                      f"{'int8' if int8 < fp32 else 'fp32'} kernel (int8 {int8 * 1e6:.0f} µs, fp32 {fp32 * 1e6:.0f} "
                      f"µs a call, in the model)")


class _Int8Embedding(nn.Module):
    """A token embedding whose saved form is int8 rows with an fp32 scale per row (token).

    `weight` is the dequantized fp32 matrix, recomputed from qweight and scale and never saved; a tied head's
    fp32 kernel multiplies by it too (dequantized_weight).
    """

    def __init__(self, qweight, scale):
        super().__init__()
        self.register_buffer("qweight", qweight)  # int8 (vocab_size, n_embd)
        self.register_buffer("scale", scale)      # fp32 (vocab_size,)
        self.register_buffer("weight", None, persistent=False)
        self.dequantize()

    def dequantize(self):
        q = self.qweight
        # a meta skeleton (see load_quantized) has nothing to compute until saved tensors are loaded into it
        if q.is_meta:
            self.weight = torch.empty(q.shape, device="meta")
        else:
            self.weight = in_huge_pages(q.float() * self.scale[:, None])  # (vocab_size, n_embd)

    def dequantized_weight(self):
        return self.weight

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.dequantize()


def check_layers(layers):
    if layers not in LAYERS:
        raise ValueError(f"layers must be 'auto' (the int8 kernel only where it is measured faster on this machine) "
                         f"or 'all' (the int8 kernel in every Linear), got {layers!r}")


def _measure_kernels(model):
    """layers="auto": the model's Int8Linear layers share the timings of its architecture in _CHOICES, which
    its _KernelChoice hook fills before the forward passes that need them."""
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    architecture = tuple(sorted(Counter((m.in_features, m.out_features) for m in linears).items()))
    choices = _CHOICES.setdefault(architecture, {})
    for m in linears:
        m.choices = choices
    model.register_forward_pre_hook(_KernelChoice(choices), with_kwargs=True)


def quantize(model, inplace=False, layers="auto"):
    """A copy of the GPT model (or model itself with inplace=True) with int8 Linear layers and embedding, in eval mode.

    The copy leaves the fp32 model usable for comparison; inplace=True saves the memory of a second fp32 model.
    Every Linear's weights become int8; layers="auto" runs the int8 kernel only where it is measured faster
    (see the module's docstring), layers="all" in every call.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        raise TypeError(f"quantize expects a mygpt GPT model, got {type(model).__name__}")
    check_layers(layers)
    if any(isinstance(m, (Int8Linear, _Int8Embedding)) for m in model.modules()):
        raise ValueError("this model is quantized already")
    if not inplace:
        model = copy.deepcopy(model)
    wte = model.transformer.wte
    tied = model.lm_head.weight is wte.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    head = model.lm_head
    # a tied embedding shares lm_head's int8 matrix and scales: rows of the head are tokens too
    qweight, scale = (head.weight, head.scale) if tied else _quantize_rows(wte.weight)
    model.transformer.wte = _Int8Embedding(qweight, scale)
    if tied:
        head.tied_weight = model.transformer.wte.dequantized_weight
    if layers == "auto":
        _measure_kernels(model)
    move_to_huge_pages(model)  # the int8 weights and what deepcopy put back into small pages (mygpt/hugepages.py)
    return model.eval()


def is_quantized(model):
    return isinstance(getattr(model, "lm_head", None), Int8Linear)


def save_quantized(model, path, tokenizer=None):
    """Write a quantized model (int8 weights, scales, config and an optional tokenizer record) atomically to path.

    A tied embedding is stored once. Load it with load_quantized(path).
    """
    if not is_quantized(model):
        raise TypeError("save_quantized needs a quantized model: call mygpt.quantize(model) first, "
                        "or save an fp32 model with the Trainer's checkpoints")
    state = {"format": FORMAT, "model_config": model.config.to_dict(), "model": model.state_dict(),
             "tokenizer": tokenizer}
    save_checkpoint(state, path)


@contextmanager
def _meta_skeleton():
    """Build modules on the meta device (shapes, no storage) without their random initialisation.

    normal_ on a meta tensor would import PyTorch's Python decompositions, about 150 MB of modules, only to
    fill tensors that hold nothing; every tensor of the skeleton is replaced by a loaded one.
    """
    normal = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.init.normal_ = normal


def load_quantized(path, map_location="cpu", layers="auto"):
    """The quantized GPT saved at path by save_quantized (or the dict read from it), in eval mode. Loading never
    executes code. layers: where the int8 kernel runs, as for quantize (the file does not record it).

    The model is built on the meta device and takes the saved tensors as they are, so no fp32 copy of
    the Linear weights is made for loading.
    """
    from mygpt.model import GPT
    check_layers(layers)
    ckpt, path = (path, "the checkpoint") if isinstance(path, dict) else (read_checkpoint(path, map_location), path)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a quantized mygpt checkpoint (no format {FORMAT!r}); load an fp32 "
                              f"checkpoint with GPT.from_checkpoint(path) and quantize it with mygpt.quantize")
    config = GPT.get_default_config()
    config.merge_from_dict(ckpt["model_config"])
    with _meta_skeleton():
        model = quantize(GPT(config), inplace=True, layers=layers)
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match the model its config describes: {err}") from err
    return move_to_huge_pages(model).eval()
