"""
The GPT language model, written to be read top to bottom:

    Linear, _gelu, RMSNorm -> CausalSelfAttention (optionally time-weighted) -> MLP -> Block -> KVCache -> GPT

and after GPT the functions it calls: _cross_entropy, _check_ids, and the config's resolution and checks.
The classes of that line are public, though only GPT and KVCache are exported from mygpt: they are the model's
structure, which print(model) shows and model.transformer.h (a list of Blocks) reaches into. The helpers start with _.

Parameter names follow OpenAI's GPT-2 layout (transformer.wte, transformer.h.0.attn.c_attn, ...)
so that GPT-2 checkpoints load by name. GPT.forward is the only forward pass: given a KVCache it
processes just the positions after the cached ones, and mygpt/generate.py only drives it.

Time-weighted attention (from the seed document) rescales the attention probabilities after the
softmax by a learned weight per (head, query position t, key position u):

    y = dropout(softmax(q k^T / sqrt(d) + causal mask) * W) @ v

'full' learns W directly, shape (n_head, block_size, block_size). 'circulant' makes W depend
mostly on the distance t - u, with a per-key correction for early tokens:

    W[h, t, u] = time_weight[h, block_size - 1 - (t - u)] * time_bias[h, 0, u]   for u <= t
    W[h, t, u] = 0                                                                for u >  t

All weights start at 1, so a fresh time-weighted model computes exactly what a vanilla one does.

Today's small-model recipe (nanochat, modded-nanogpt) is a set of switches, each off by default so that
GPT-2 loads and computes exactly as it always did (mygpt.recipes names the set that turns them on):

    pos_emb='rope'      q and k rotated by their absolute position (mygpt/rotary.py) instead of adding
                        learned position embeddings ('learned'), or no positions at all (None)
    norm='rmsnorm'      x / sqrt(mean_c(x²) + 1e-6), no gain and no bias, instead of LayerNorm; for the
                        blocks, the final norm and, with embd_norm, right after the embedding
    qk_norm             q and k RMS-normalised per head (before the rotation): bounded attention logits
    mlp                 'gelu': W2 gelu(W1 x); 'relu2': W2 relu(W1 x)²; 'swiglu': W2 (silu(W1g x) * W1u x)
    n_kv_head           grouped-query attention: n_kv_head key/value heads, each shared by n_head / n_kv_head
                        query heads (the KV cache holds n_kv_head heads)
    logit_softcap       logits = cap · tanh(logits / cap): no logit grows past ±cap
    zero_init           every residual branch's output projection and the head start at 0, so a fresh
                        model is the identity on its residual stream and predicts the uniform distribution
"""

import math
import numbers
import platform
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from mygpt.kernels import time_weighted_attention, triton_available
from mygpt.recipes import PRESETS
from mygpt.rotary import apply_rotary, rotary_angles
from mygpt.checkpoint import load_checkpoint, load_model_state
from mygpt.hugepages import in_huge_pages, move_to_huge_pages
# MIN_WEIGHTS: below 512 KiB of fp32 weights F.linear is faster than oneDNN or matvec (oneDNN's call costs ~15 µs,
# MKL's ~3 µs, and the weights sit in cache)
from mygpt.matvec import MIN_WEIGHTS, matvec, one_row as matvec_one_row
from mygpt.utils import CfgNode

_TIME_WEIGHTINGS = (None, "full", "circulant")
_ATTENTIONS = ("auto", "torch", "triton")
_POS_EMBS = ("learned", "rope", None)
_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "relu2", "swiglu")
RMS_EPS = 1e-6  # the eps of every RMSNorm: that of Llama and Qwen (mygpt.export_llama writes it as theirs)

# (n_layer, n_head, n_embd) of the named model shapes
_MODEL_SHAPES = {
    # GPT-1
    "openai-gpt": (12, 12, 768),
    # GPT-2
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    # Gopher
    "gopher-44m": (8, 16, 512),
    # small shapes for small tasks
    "gpt-mini": (6, 6, 192),
    "gpt-micro": (4, 4, 128),
    "gpt-nano": (3, 3, 48),
}


# oneDNN's linear op, for products that need no gradient on x86 CPUs (see Linear); None where PyTorch lacks it
_ONEDNN_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                  if torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64") else None)
_ONEDNN_LINEAR = getattr(_ONEDNN_LINEAR, "default", None)  # the overload itself: no overload lookup per call
# whether oneDNN multiplies bf16 on this CPU (natively or emulated with AVX-512): Linear's bf16 autocast path
_ONEDNN_BF16 = _ONEDNN_LINEAR is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# up to this many positions, bf16 attention that needs a backward takes the plain path on the CPU (_cpu_bf16_backward)
_CPU_BF16_PLAIN_MAX_T = 512


class Linear(nn.Linear):
    """nn.Linear (same parameters, same fp32 maths) whose products without autograd run in oneDNN on x86 CPUs.

    Decoding one token multiplies every weight matrix by one vector: a pass over the weights that
    memory bandwidth bounds. PyTorch hands fp32 products to MKL, whose matrix-vector path on AMD CPUs
    runs on one thread at a third of the bandwidth (the seed shape's 12 products: 3.3 ms against
    oneDNN's 1.0 ms on 2 threads of an AMD EPYC); oneDNN was no slower at any row count measured. Below 512 KiB
    of weights (the seed shape's 65-token head, every layer of a 128-wide model) the call itself dominates: there
    F.linear is 3-4x faster at one row, and a 4 x 128 model generates 1.8x faster with it (1 or 2 threads).
    oneDNN's op has no backward, so training keeps F.linear. Under torch.compile the op goes in as a custom
    op (inductor's own lowering of it takes only weights frozen into the graph).

    One row at a time (decoding) the product is mygpt.matvec's kernel, which reads the weights at memory's
    speed where oneDNN does not. In bf16 autocast autocast casts the fp32 weights to bf16 at every call: a read
    of 6 bytes a weight where a product needs 2. So inside bf16_weight_copies() (precision='bf16' for inference,
    mygpt.precision_context) the weights are cast once, into huge pages, and kept beside the fp32 ones (half
    their memory again) until its exit; one row is multiplied by them in matvec (fp32 out), several in oneDNN
    (bf16 out, as autocast's). Elsewhere bf16 autocast runs as it always does (training, the Trainer's evals).
    """

    def forward(self, x):
        weight, bias = self.weight, self.bias  # each attribute read costs ~0.5 µs: once each
        if (_ONEDNN_LINEAR is None or torch.is_grad_enabled() or not x.is_cpu or weight.dtype != torch.float32
                or weight.numel() < MIN_WEIGHTS):
            return F.linear(x, weight, bias)
        one_row = matvec_one_row(weight, x)  # the rest of matvec.pays: checked just above
        if torch.is_autocast_enabled("cpu"):
            if not _multiplies_bf16_copies():
                return F.linear(x, weight, bias)
            weight16, bias16 = _bf16_weights(self)
            if one_row:
                return matvec(weight16, x, bias=bias)
            return _ONEDNN_LINEAR(x.to(torch.bfloat16), weight16, bias16, "none", [], "")
        if x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        if one_row:
            return matvec(weight, x, bias=bias)
        if torch.compiler.is_compiling():
            return _onednn_linear(x, weight, bias)
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    def one_row_operands(self):
        """(weight, scale, bias, quantize_x): what forward multiplies one row by here, in matvec's terms, for
        mygpt.decode: the fp32 weight, or in bf16 autocast inside bf16_weight_copies() its bf16 copy; None in an
        autocast where forward runs F.linear (activations in bf16, which mygpt.decode does not compute)."""
        if not torch.is_autocast_enabled("cpu"):
            return self.weight, None, self.bias, False
        if _ONEDNN_LINEAR is None or not _multiplies_bf16_copies():
            return None
        return _bf16_weights(self)[0], None, self.bias, False


# Linear -> (bf16 weight, bf16 bias) while bf16_weight_copies() is open (None outside it): outside the modules,
# so that state dicts and copies never hold them
_BF16 = None


@contextmanager
def bf16_weight_copies():
    """Inside: each large Linear in bf16 autocast without autograd multiplies by a bf16 copy of its weights,
    made at its first call and dropped at the exit, the outermost one where these nest. For inference: the
    weights must not change inside (optimizers change them in place, and fused ones leave no trace of it)."""
    global _BF16
    outermost = _BF16 is None
    if outermost:
        _BF16 = weakref.WeakKeyDictionary()
    try:
        yield
    finally:
        if outermost:
            _BF16 = None


def _multiplies_bf16_copies():
    """In CPU autocast: whether a large Linear multiplies by its bf16 copy (bf16 autocast inside bf16_weight_copies(),
    oneDNN's bf16 kernels, outside a compiled graph) rather than in F.linear."""
    return (_BF16 is not None and _ONEDNN_BF16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling())


def _bf16_weights(linear):
    """(weight, bias) of linear in bf16, cast at its first call inside bf16_weight_copies()."""
    kept = _BF16.get(linear)
    if kept is None:
        with torch.inference_mode(False):  # ordinary tensors, usable under no_grad as well as inference mode
            weight = in_huge_pages(linear.weight.detach().to(torch.bfloat16))
            bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        kept = _BF16[linear] = (weight, bias)
    return kept


@torch.library.custom_op("mygpt::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """_ONEDNN_LINEAR as an operator that a compiled graph calls as it is: x (..., in) -> (..., out)."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _onednn_linear_shape(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _gelu(x):
    """GELU in the tanh approximation that GPT-2 was trained with; exact (erf) in bf16 on the CPU.

    The two differ by at most 4.7e-4 (at x = -2.7), and PyTorch's CPU kernels for the approximation are slow in
    bf16: forward and backward over a (8, 256, 1536) activation take 24 ms against 9.5 ms exactly (one thread
    of an AMD EPYC with AVX512-BF16), a tenth of a 6 x 384 model's bf16 training step. fp32 keeps GPT-2's tanh.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def _rms_norm(x):
    """x / sqrt(mean(x²) + eps) over the last dimension, parameter-free (no gain)."""
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


class RMSNorm(nn.Module):
    """The norm='rmsnorm' module: LayerNorm without the mean, the gain or the bias, hence no parameters."""

    def forward(self, x):
        return _rms_norm(x)


def _make_norm(config):
    """The normalisation config.norm names, over n_embd channels."""
    if config.norm == "rmsnorm":
        return RMSNorm()
    return nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)


def _dropout(x, p, training):
    """F.dropout, skipped outright in eval mode or at p = 0 (decoding calls it several times per token)."""
    return F.dropout(x, p, True) if training and p > 0.0 else x


def circulant_time_weighting(time_weight, time_bias, T, first_row=0):
    """Rows first_row..T-1 of the (n_head, T, T) matrix of 'circulant' time weighting.

    Row t, column u holds time_weight[h, block_size - 1 - (t - u)] * time_bias[h, 0, u] on and
    below the diagonal and 0 above it: a gather by distance instead of the seed's pad/tile/reshape.
    """
    block_size = time_weight.shape[1]
    rows = torch.arange(first_row, T, device=time_weight.device)
    cols = torch.arange(T, device=time_weight.device)
    distance = rows[:, None] - cols[None, :]             # t - u
    index = (block_size - 1 - distance).clamp(max=block_size - 1)
    by_distance = time_weight[:, index]                   # (n_head, T - first_row, T)
    by_distance = by_distance.masked_fill(distance < 0, 0.0)
    return by_distance * time_bias[:, :, :T]


def _cpu_bf16_backward(q, T):
    """Whether attention over T positions will run backward in bf16 on the CPU, at a length where the path of
    CausalSelfAttention.attend below (a baddbmm, softmax and bmm) beats PyTorch's CPU flash attention.

    Its bf16 backward is slow (one thread of an AMD EPYC with AVX512-BF16, forward and backward): at 64
    positions, head size 32, 6.8 ms against 1.4 ms for the plain path; at 256, head size 64, 45 against 28 ms;
    at 512, 113 against 82; at 1024, 374 against 462. The scores are then rounded to bf16 before the softmax,
    as autocast does on that path for time weighting and dropout already; fp32 keeps flash attention (as fast or
    faster there).
    """
    if q.device.type != "cpu" or not q.requires_grad or T > _CPU_BF16_PLAIN_MAX_T:
        return False
    # autocast: q may be fp32 here (rotated by fp32 angles) and still be attended in bf16
    return (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype) == torch.bfloat16


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention, with optional time weighting of the probabilities."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache holds this layer's keys and values
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head  # grouped-query attention below n_head
        self.n_embd = config.n_embd
        self.head_size = config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.rope_base = config.rope_base if config.pos_emb == "rope" else None
        # q (n_head heads), then k and v (n_kv_head heads each): 3 n_embd outputs without GQA
        self.c_attn = Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_pdrop = config.attn_pdrop
        self.resid_pdrop = config.resid_pdrop
        self.token_shift = config.token_shift
        self.time_weighting_kind = config.time_weighting
        self.attention = config.attention
        # 'auto' takes the Triton kernel for time weighting on CUDA (vanilla attention has flash attention)
        self.auto_kernel = config.attention == "auto" and config.time_weighting is not None and triton_available()
        if config.time_weighting == "full":
            self.time_weighting = nn.Parameter(torch.ones(config.n_head, config.block_size, config.block_size))
        elif config.time_weighting == "circulant":
            self.time_weight = nn.Parameter(torch.ones(config.n_head, config.block_size))
            self.time_bias = nn.Parameter(torch.ones(config.n_head, 1, config.block_size))

    def weights(self, T, first_row=0):
        """Rows first_row..T-1 of the (n_head, T, T) time-weighting matrix, or None without time weighting."""
        if self.time_weighting_kind == "full":
            return self.time_weighting[:, first_row:T, :T]
        if self.time_weighting_kind == "circulant":
            return circulant_time_weighting(self.time_weight, self.time_bias, T, first_row)
        return None

    def fused(self, q):
        """Whether mygpt.kernels' fused Triton kernel computes attention over a whole sequence (config.attention)."""
        dropout = self.attn_pdrop if self.training else 0.0
        if self.attention == "triton":
            if dropout > 0.0:
                raise ValueError("attention='triton' has no attention dropout: set attn_pdrop=0 to train with it, "
                                 "or use attention='auto' or 'torch'")
            return True
        return self.auto_kernel and q.is_cuda and dropout == 0.0

    def shift(self, x, previous):
        """Token shift: the first half of the channels of x (B, T, C) come from the position before.

        previous is the (B, 1, C) input of the position before x[:, 0], or None at the start (zeros).
        """
        half = self.n_embd // 2
        if previous is None:
            previous = x.new_zeros(x.shape[0], 1, x.shape[2])
        shifted = torch.cat([previous[:, :, :half], x[:, :-1, :half]], dim=1)
        return torch.cat([shifted, x[:, :, half:]], dim=2)

    def attend(self, q, k, v, W):
        """softmax(q k^T / sqrt(d), causal) [* W] -> dropout -> @ v, for queries at the last positions.

        q (B, nh, Tq, hs) covers the last Tq of the Tk key positions of k, v (B, nh, Tk, hs); W, when
        given, is the (nh, Tq, Tk) slice of the time-weighting matrix for exactly those query rows.
        """
        dropout = self.attn_pdrop if self.training else 0.0
        Tq, Tk = q.shape[2], k.shape[2]
        # The fused kernels cannot apply weights after the softmax, and on the CPU they have no
        # dropout (PyTorch then falls back to a path slower than the one below).
        if W is None and (dropout == 0.0 or q.device.type != "cpu") and Tq in (1, Tk) and not _cpu_bf16_backward(q, Tk):
            # Tq > 1 means Tq == Tk here (one query needs no mask), and is a plain bool when the cache's
            # length, hence Tk, is a symbol in a compiled decode step
            if Tq == 1 and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # decoding in bf16 autocast: PyTorch's CPU attention at one query is 3-5x slower in bf16 than in
                # fp32 (41-128 keys, AMD EPYC with AVX512-BF16), and reads no weights that bf16 would halve
                with torch.autocast("cpu", enabled=False):
                    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=Tq > 1)
        # One baddbmm computes the scaled scores and adds the causal -inf mask in one pass over memory.
        B, nh, _, hs = q.shape
        mask = torch.full((Tk, Tk), float("-inf"), device=q.device, dtype=q.dtype).triu(1)[Tk - Tq:]
        scores = torch.baddbmm(mask, q.reshape(B * nh, Tq, hs), k.reshape(B * nh, Tk, hs).transpose(1, 2),
                               alpha=1.0 / math.sqrt(hs)).view(B, nh, Tq, Tk)
        att = torch.softmax(scores, dim=-1)
        if W is not None:
            att = att * W  # this is the time weighting
        att = F.dropout(att, dropout, self.training)
        return att @ v

    def forward(self, x, kv_cache=None):
        """x (B, T, C) -> (B, T, C). With kv_cache, x holds the positions that follow the cached ones."""
        B, T, C = x.shape
        start = 0 if kv_cache is None else kv_cache.length  # absolute position of x[:, 0]
        if self.token_shift:
            x = self.shift(x, None if kv_cache is None else kv_cache.swap_last_input(self.layer_idx, x))
        hs, n_kv = self.head_size, self.n_kv_head
        if n_kv == self.n_head:
            # one view and one permute give the three (B, nh, T, hs) views that split + 3 views + 3 transposes would
            qkv = self.c_attn(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
            q, k, v = qkv.unbind(0)
        else:  # grouped-query attention: n_kv_head heads of k and of v after the n_head heads of q
            q, k, v = self.c_attn(x).split([C, n_kv * hs, n_kv * hs], dim=2)
            q = q.view(B, T, self.n_head, hs).transpose(1, 2)                          # (B, nh, T, hs)
            k, v = (t.view(B, T, n_kv, hs).transpose(1, 2) for t in (k, v))             # (B, n_kv, T, hs)
        if self.qk_norm:
            q, k = _rms_norm(q), _rms_norm(k)
        if self.rope_base is not None:  # at absolute positions start..start+T-1, so cached keys stay valid
            cos, sin = rotary_angles(hs, torch.arange(start, start + T, device=x.device), self.rope_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, n_kv, start + T, hs)
        if n_kv != self.n_head:  # query head h reads key/value head h // (n_head / n_kv)
            k, v = (t.repeat_interleave(self.n_head // n_kv, dim=1) for t in (k, v))  # (B, nh, start + T, hs)
        if start == 0 and self.fused(q):  # without the (B, nh, T, T) probabilities
            y = time_weighted_attention(q, k, v, getattr(self, "time_weighting", None),
                                        getattr(self, "time_weight", None), getattr(self, "time_bias", None))
        else:
            y = self.attend(q, k, v, self.weights(start + T, first_row=start))  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return _dropout(self.c_proj(y), self.resid_pdrop, self.training)


def _mlp_hidden_size(config):
    """4 n_embd, or for SwiGLU (two input matrices) 8/3 n_embd rounded up to a multiple of 8: the same parameters."""
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return 8 * math.ceil(config.n_embd / 3)  # 8/3 n_embd, rounded up to a multiple of 8
    return 4 * config.n_embd


class MLP(nn.Module):
    """The position-wise feed-forward network: n_embd -> hidden -> activation -> n_embd.

    'gelu' (GPT-2): c_proj(gelu(c_fc x)). 'relu2' (Primer, So et al. 2021): c_proj(relu(c_fc x)²).
    'swiglu' (Shazeer 2020, Llama): c_fc makes a gate g and a value u, c_proj(silu(g) * u).
    """

    def __init__(self, config):
        super().__init__()
        hidden = _mlp_hidden_size(config)
        self.kind = config.mlp
        fan_out = 2 * hidden if config.mlp == "swiglu" else hidden  # swiglu: the gate's rows, then the value's
        self.c_fc = Linear(config.n_embd, fan_out, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.resid_pdrop = config.resid_pdrop

    def forward(self, x):
        h = self.c_fc(x)                       # (B, T, hidden) or (B, T, 2 hidden)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = _gelu(h)
        return _dropout(self.c_proj(h), self.resid_pdrop, self.training)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = _make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """What a model must remember of the positions it has seen, to process only new ones.

    Per layer: keys and values (preallocated for block_size positions; n_kv_head heads, after qk_norm
    and the rotation) and, for token shift, the attention input of the last position. `length` counts
    the positions held; GPT.forward advances it.
    """

    def __init__(self, config, batch_size, device=None, dtype=None):
        n_kv_head = getattr(config, "n_kv_head", None) or config.n_head
        shape = (batch_size, n_kv_head, config.block_size, config.n_embd // config.n_head)  # (B, n_kv, T, hs)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.last_input = [None] * config.n_layer
        self.length = 0

    def append(self, layer, k, v):
        """Store k, v (B, nh, T, hs) after the cached positions; return the keys and values of all of them."""
        keys, values, T = self.keys[layer], self.values[layer], k.shape[2]
        keys.narrow(2, self.length, T).copy_(k)  # narrow: the cheapest view, once per layer and token
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, self.length + T), values.narrow(2, 0, self.length + T)

    def swap_last_input(self, layer, x):
        """Remember x[:, -1:] (B, 1, C) of this layer's attention input; return the one remembered before.

        A copy when x holds several positions (a prompt): the prompt's whole input is not kept alive, and every
        step's is laid out alike, as a compiled decode step expects."""
        previous, self.last_input[layer] = self.last_input[layer], x[:, -1:].contiguous()
        return previous


class GPT(nn.Module):
    """A GPT language model: token (+ position) embeddings, n_layer blocks, a final norm and a linear head.

    Dropout is applied by a function rather than nn.Dropout modules: the same operation, without a
    module call per use, which adds up when decoding one token at a time.
    """

    @staticmethod
    def get_default_config():
        C = CfgNode()
        # the shape: a model_type preset, or n_layer, n_head and n_embd (a preset fills those left None)
        C.model_type = None
        C.n_layer = None
        C.n_head = None
        C.n_embd = None
        # these are set by the task
        C.vocab_size = None
        C.block_size = None
        # dropout
        C.embd_pdrop = 0.1
        C.resid_pdrop = 0.1
        C.attn_pdrop = 0.1
        # architecture switches
        C.bias = True                # biases in Linear and LayerNorm, as GPT-2
        C.tie_weights = True         # lm_head shares the token embedding matrix, as GPT-2
        C.time_weighting = None      # None, 'full' or 'circulant'
        C.token_shift = False        # the seed's companion trick to time weighting
        C.pos_emb = "learned"        # 'learned' absolute positions, 'rope' (rotary q, k) or None (time weighting
                                     # can replace them); the True/False of older configs mean 'learned'/None
        C.rope_base = 10000.0        # RoPE's base: θ_j = base^(-2j/head_size)
        C.norm = "layernorm"         # 'layernorm' (GPT-2) or 'rmsnorm' (parameter-free)
        C.embd_norm = False          # normalise the embedding before the first block
        C.qk_norm = False            # RMS-normalise q and k per head before attention
        C.mlp = "gelu"               # 'gelu' (GPT-2), 'relu2' or 'swiglu'
        C.mlp_hidden = None          # None: 4 n_embd (8/3 n_embd for swiglu)
        C.n_kv_head = None           # key/value heads for grouped-query attention; None: n_head
        C.logit_softcap = None       # None, or cap: logits = cap * tanh(logits / cap)
        C.zero_init = False          # output projections and head start at zero (needs tie_weights=False)
        C.preset = None              # the recipe these settings started from (mygpt.recipes), a record only
        # 'auto': time-weighted attention in mygpt.kernels' Triton kernel on CUDA when Triton is installed and
        # there is no attention dropout, PyTorch otherwise; 'torch'; 'triton': always the kernel (CPU tensors
        # need TRITON_INTERPRET=1). Decoding with a KVCache past the prompt always takes PyTorch.
        C.attention = "auto"
        return C

    def __init__(self, config):
        super().__init__()
        config = _resolve_config(config)
        self.config = config
        self.block_size = config.block_size
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=_make_norm(config),
        )
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.embd_norm:
            modules["ln_e"] = _make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # one (vocab_size, n_embd) matrix reads tokens in and scores them out
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two residual branches, so their output projections start smaller
        # to keep the variance of the residual stream from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init:  # each block starts as the identity, the head as the uniform distribution
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or name == "lm_head.weight":
                    torch.nn.init.zeros_(p)
        move_to_huge_pages(self)  # on the CPU, decoding streams the weights faster from 2 MiB pages (mygpt/hugepages.py)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def num_parameters(self, include_position_embedding=True):
        n = sum(p.numel() for p in self.parameters())  # a tied matrix counts once
        if not include_position_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def check_input(self, idx, start=0):
        """Raise a clear error for token ids the model cannot take at positions start, start+1, ..."""
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids (e.g. torch.long), got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got shape {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError("idx holds an empty sequence; give at least one token")
        if start + idx.shape[1] > self.block_size:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(f"sequence of length {idx.shape[1]}{where} is longer than block_size {self.block_size}; "
                             f"crop it to the last {self.block_size} tokens or build the model with a larger block_size")
        _check_ids(idx, self.config.vocab_size, "token id")

    def check_batch(self, idx, targets):
        """The id checks of forward(idx, targets), for a training batch still on the host: the Trainer runs it on
        every batch before the batch goes to the device, where an id outside the vocabulary would be a device-side
        assert and checking it there a sync."""
        _check_ids(idx, self.config.vocab_size, "token id")
        _check_ids(targets, self.config.vocab_size, "target", ignore_index=-1)

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits (B, T, vocab_size) for idx (B, T), and the mean cross-entropy over targets != -1 when given.

        With a KVCache, idx holds the tokens that follow the cached ones (a whole prompt, then one token
        at a time); their keys and values are added to the cache.
        """
        start = 0 if kv_cache is None else kv_cache.length  # absolute position of idx[:, 0]
        self.check_input(idx, start)
        B, T = idx.shape
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe.weight[start:start + T]  # + (T, C): the rows of positions start..start+T-1
        if self.config.embd_norm:
            x = self.transformer.ln_e(x)
        x = _dropout(x, self.config.embd_pdrop, self.training)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = _cross_entropy(logits, targets)
        return logits, loss

    def configure_optimizers(self, train_config):
        """AdamW that decays only the weights of Linear layers (lm_head's, also when tied to the embedding).

        Biases and LayerNorm gains have no reason to shrink, untied embeddings are lookups, and the time
        weights start at 1 (a decay toward 0 would switch attention off), so none of those decay.
        """
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())  # each tensor once, also a tied one
        groups = [
            {"params": [p for p in params if id(p) in decayed], "weight_decay": train_config.weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
        ]
        # The fused kernel updates all parameters in one pass: the same maths, less time.
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=train_config.learning_rate, betas=train_config.betas, fused=fused)

    def generate(self, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, top_p=None,
                 use_cache=True, generator=None, stop_tokens=None, compile=False):
        """Continue each sequence of idx (B, T) by up to max_new_tokens tokens; see mygpt.generate."""
        from mygpt.generate import generate
        return generate(self, idx, max_new_tokens, temperature=temperature, do_sample=do_sample, top_k=top_k,
                        top_p=top_p, use_cache=use_cache, generator=generator, stop_tokens=stop_tokens,
                        compile=compile)

    def quantize(self, inplace=False, layers="auto"):
        """An int8 copy of this model for CPU inference (every Linear per output channel; layers="auto" runs the
        int8 kernel only where it is measured faster, "all" everywhere); see mygpt.quantize."""
        from mygpt.quantize import quantize
        return quantize(self, inplace=inplace, layers=layers)

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """A GPT with OpenAI GPT-2 weights, read through Hugging Face transformers, in eval mode; see mygpt.pretrained."""
        from mygpt.pretrained import load_gpt2
        return load_gpt2(cls, name_or_dir, **overrides)

    @staticmethod
    def upgrade_config(saved):
        """A saved config (a plain dict) as today's configs spell it: pos_emb=True of older checkpoints is
        'learned'. The Trainer reads a checkpoint's config through it before comparing it with the model's."""
        return dict(saved, pos_emb=_upgraded_pos_emb(saved["pos_emb"])) if "pos_emb" in saved else dict(saved)

    @classmethod
    def from_checkpoint(cls, source, map_location="cpu", **overrides):
        """The model of a checkpoint written by the Trainer, its weights loaded, in eval mode.

        source is the checkpoint's path, or the dict that load_checkpoint(path) returned (read once);
        overrides set config fields that leave the weights' shapes alone (e.g. attention='torch', dropout).
        """
        ckpt = load_checkpoint(source, map_location=map_location) if not isinstance(source, dict) else source
        name = source if not isinstance(source, dict) else "the checkpoint"
        if not ckpt.get("model_config"):
            raise ValueError(f"{name} records no model config (it was written for a model that is not a mygpt GPT); "
                             f"build the model yourself and pass it to load_checkpoint(path, model=...)")
        config = cls.get_default_config()
        config.merge_from_dict(ckpt["model_config"])
        config.merge_from_dict(overrides)
        model = cls(config)
        load_model_state(model, ckpt["model"], source=name)
        return model.eval()


def _cross_entropy(logits, targets):
    """Mean cross-entropy (B, T, V) x (B, T) over the targets that are not -1; 0 when every target is -1.

    A micro-batch without targets then adds nothing to training instead of a 0/0 = NaN.
    """
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:2]:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a tensor of shape {tuple(logits.shape[:2])} (that of idx), got {shape}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids (-1 to ignore a position), got dtype {targets.dtype}")
    _check_ids(targets, logits.size(-1), "target", ignore_index=-1)
    targets = targets.reshape(-1).long()
    total = F.cross_entropy(logits.view(-1, logits.size(-1)), targets, ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum().clamp(min=1)


def _check_ids(ids, vocab_size, what, ignore_index=None):
    """Raise a ValueError for an id outside [0, vocab_size) (ignore_index aside), on the CPU only.

    On a GPU the check would cost a device sync per call; the Trainer has the model check each batch on the
    host before it is copied there (GPT.check_batch), and a compiled graph cannot hold a data-dependent branch.
    """
    if ids.device.type != "cpu" or torch.compiler.is_compiling():
        return
    lowest = 0 if ignore_index is None else ignore_index  # ignore_index is -1, just below the first id
    lo, hi = (int(t) for t in torch.aminmax(ids))  # one pass over the ids
    if lo < lowest or hi >= vocab_size:
        extra = f" ({ignore_index} marks a position to ignore)" if ignore_index is not None else ""
        raise ValueError(f"{what} {lo if lo < lowest else hi} is outside the vocabulary [0, {vocab_size}){extra}")


def _upgraded_pos_emb(value):
    """pos_emb as today's configs spell it: an older config's boolean (or its command-line spelling) means
    learned positions or none; any other value is returned as it is."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return "learned" if str(value).lower() == "true" else None
    return value


def _resolve_config(config):
    """The config with n_layer/n_head/n_embd filled from model_type, checked, with errors that say what to fix.

    The result names its preset and its shape, and GPT(model.config) rebuilds the same model.
    """
    config = GPT.get_default_config() if config is None else CfgNode(**config.to_dict())
    shape_keys = ("n_layer", "n_head", "n_embd")
    if config.model_type is not None:
        if config.model_type not in _MODEL_SHAPES:
            raise ValueError(f"unknown model_type {config.model_type!r}; choose one of {sorted(_MODEL_SHAPES)} "
                             f"or leave model_type None and give n_layer, n_head and n_embd")
        for key, preset in zip(shape_keys, _MODEL_SHAPES[config.model_type]):
            given = getattr(config, key)
            if given is not None and given != preset:
                raise ValueError(f"model_type {config.model_type!r} has {key}={preset}, but {key}={given} was given; "
                                 f"set model_type=None to use your own shape, or drop {key}")
            setattr(config, key, preset)
    elif any(getattr(config, k) is None for k in shape_keys):
        raise ValueError("give the model's shape: a model_type (e.g. 'gpt-mini') or all of n_layer, n_head, n_embd")
    for key in shape_keys + ("vocab_size", "block_size"):
        value = getattr(config, key)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
        setattr(config, key, int(value))  # a numpy integer becomes a plain int, as checkpoints store it
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}) "
                         f"so that every head gets n_embd // n_head channels")
    for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"config.{key} is a dropout probability and must be in [0, 1), got {value!r}")
    config.pos_emb = _upgraded_pos_emb(config.pos_emb)
    for key in ("bias", "tie_weights", "token_shift", "embd_norm", "qk_norm", "zero_init"):
        if not isinstance(getattr(config, key), bool):
            raise TypeError(f"config.{key} must be True or False, got {getattr(config, key)!r}")
    for key, choices in (("pos_emb", _POS_EMBS), ("norm", _NORMS), ("mlp", _MLPS)):
        if getattr(config, key) not in choices:
            raise ValueError(f"unknown {key} {getattr(config, key)!r}; choose one of {list(choices)}")
    head_size = config.n_embd // config.n_head
    if config.pos_emb == "rope":
        if head_size % 2:
            raise ValueError(f"pos_emb='rope' rotates channel pairs, but the head size n_embd // n_head = {head_size} "
                             f"is odd: choose n_embd and n_head with an even quotient, or pos_emb='learned'")
        if isinstance(config.rope_base, bool) or not isinstance(config.rope_base, (int, float)) or config.rope_base <= 1:
            raise ValueError(f"config.rope_base must be a number > 1, got {config.rope_base!r}")
    if config.n_kv_head is not None:
        n_kv = config.n_kv_head
        if isinstance(n_kv, bool) or not isinstance(n_kv, numbers.Integral) or n_kv <= 0:
            raise ValueError(f"config.n_kv_head must be a positive integer or None (= n_head), got {n_kv!r}")
        config.n_kv_head = int(n_kv)
        if config.n_head % n_kv:
            divisors = [d for d in range(1, config.n_head + 1) if config.n_head % d == 0]
            raise ValueError(f"n_kv_head ({n_kv}) must divide n_head ({config.n_head}) so that each key/value head "
                             f"serves the same number of query heads; choose one of {divisors}")
    if config.mlp_hidden is not None and (isinstance(config.mlp_hidden, bool)
                                          or not isinstance(config.mlp_hidden, numbers.Integral)
                                          or config.mlp_hidden <= 0):
        raise ValueError(f"config.mlp_hidden must be a positive integer or None, got {config.mlp_hidden!r}")
    cap = config.logit_softcap
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise ValueError(f"config.logit_softcap must be None (off) or a positive number, got {cap!r}")
    if config.preset not in PRESETS:
        raise ValueError(f"unknown preset {config.preset!r}; choose one of {[None, *PRESETS[1:]]} (see mygpt.recipes)")
    if config.zero_init and config.tie_weights:
        raise ValueError("zero_init=True starts the head at zero, and with tie_weights=True the head is the token "
                         "embedding, which would start at zero too: set tie_weights=False")
    if config.time_weighting not in _TIME_WEIGHTINGS:
        raise ValueError(f"unknown time_weighting {config.time_weighting!r}; choose None, 'full' or 'circulant'")
    if config.attention not in _ATTENTIONS:
        raise ValueError(f"unknown attention {config.attention!r}; choose 'auto' (the Triton kernel on CUDA when "
                         f"Triton is installed), 'torch' or 'triton'")
    return config
