"""
int8 inference: every nn.Linear of a GPT holds int8 weights with one scale per output channel.

    w[o, i] ≈ q[o, i] * scale[o],   scale[o] = max_i |w[o, i]| / 127,   q = round(w / scale) in [-127, 127]

On the CPU the product runs in PyTorch's own int8 kernels (fbgemm through torch.ops.quantized.linear_dynamic):
each call quantizes its input to 8 bits with one scale, multiplies in int32 and rescales to fp32. At batch 1 a
decoder is limited by reading its weights from memory, and int8 weights are a quarter of fp32's bytes. Elsewhere
(a GPU, a build without those kernels) the weights are dequantized for an ordinary fp32 matmul.

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
    save_quantized(qmodel, "model-int8.pt")     # about 1/4 of the fp32 file
    qmodel = load_quantized("model-int8.pt")    # in eval mode; qmodel(idx), qmodel.generate(...) as usual
"""

import copy
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from mygpt.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

FORMAT = "mygpt-int8"  # the "format" entry of a quantized checkpoint

# Without VNNI, the x86 kernels add pairs of 8-bit products in 16 bits, which 8-bit activations could
# saturate: there the activations get 7 bits (PyTorch's reduce_range). VNNI accumulates in 32 bits.
REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def quantize_rows(weight):
    """(int8 q, fp32 scale) with weight[o] ≈ q[o] * scale[o]: symmetric, one scale per row (output channel)."""
    if weight.is_meta:  # a skeleton to load saved tensors into: shapes only, nothing to compute
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[0], device="meta")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 (out, in) and an fp32 scale per output channel. Inference only."""

    def __init__(self, weight, scale, bias=None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scale", scale)    # fp32 (out,)
        self.register_buffer("bias", bias)      # fp32 (out,) or None
        self._packed = None                     # the kernels' own layout, built at first use, never saved

    @classmethod
    def from_linear(cls, linear):
        q, scale = quantize_rows(linear.weight)
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

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.device.type == "cpu":
            packed = self.packed()
            if packed is not False:
                return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # new weights: pack again

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """A token embedding whose saved form is int8 rows with an fp32 scale per row (token).

    `weight` is the dequantized fp32 matrix, recomputed from qweight and scale and never saved.
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
        self.weight = torch.empty(q.shape, device="meta") if q.is_meta else q.float() * self.scale[:, None]

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.dequantize()


def quantize(model, inplace=False):
    """A copy of the GPT model (or model itself with inplace=True) with int8 Linear layers and embedding, in eval mode.

    The copy leaves the fp32 model usable for comparison; inplace=True saves the memory of a second fp32 model.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        raise TypeError(f"quantize expects a mygpt GPT model, got {type(model).__name__}")
    if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()):
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
    qweight, scale = (head.weight, head.scale) if tied else quantize_rows(wte.weight)
    model.transformer.wte = Int8Embedding(qweight, scale)
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
def meta_skeleton():
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


def load_quantized(path, map_location="cpu"):
    """The quantized GPT saved at path by save_quantized (or the dict read from it), in eval mode. Loading never
    executes code.

    The model is built on the meta device and takes the saved tensors as they are, so no fp32 copy of
    the Linear weights is ever made.
    """
    from mygpt.model import GPT
    ckpt, path = (path, "the checkpoint") if isinstance(path, dict) else (read_checkpoint(path, map_location), path)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a quantized mygpt checkpoint (no format {FORMAT!r}); load an fp32 "
                              f"checkpoint with GPT.from_checkpoint(path) and quantize it with mygpt.quantize")
    config = GPT.get_default_config()
    config.merge_from_dict(ckpt["model_config"])
    with meta_skeleton():
        model = quantize(GPT(config), inplace=True)
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match the model its config describes: {err}") from err
    return model.eval()
