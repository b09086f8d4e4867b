"""
Decoding's one-token step of a mygpt GPT in one call to C++ (mygpt/decode.cpp), on the CPU.

model.forward's one-token step of GPT-2 124M calls ~25 PyTorch operations a block around its products (norms,
views, the cache's copies, attention, GELU, residuals); their dispatch in Python cost 1.6-1.9 ms a token on one
thread of an AMD EPYC, a fifth of the int8 step, where llama.cpp's step is all C. decode.cpp does the whole step
(embeddings, every block, the head) in one call, with the products of mygpt/matvec.cpp and each Linear's own
operands (one_row_operands: fp32, its bf16 copy inside bf16_weight_copies(), int8 with the kernel its measurement
chose), writing the keys and values into the same KVCache, so the prompt's pass (model.forward) and the C++ steps
share one cache. GPT-2 124M's step then costs what its products cost (see the README's *Decoding against
llama.cpp*).

stream() and generate() take it for every one-token step with a cache, up to MAX_ROWS sequences (each weight row
is read once for all of them), on the CPU, no autograd, where `unsupported(model)` is None: every switch of
mygpt.model's GPT (the seed's time weighting and token shift, and the modern recipe's rotary positions, RMSNorm,
QK-norm, ReLU² or SwiGLU, grouped-query attention, soft-capped logits, an embedding norm), with mygpt's own layers
(or the int8 ones of model.quantize()) and no hooks. Other models, more rows, compile=True and a kernel that
cannot be built keep model.forward. The first one-token step of a
generation runs model.forward too: an int8 model measures its kernels there, which the C++ step then uses.
"""

import torch
import torch.nn as nn

from mygpt.matvec import Kernel, kind_of
from mygpt.model import GPT, Linear, RMSNorm
from mygpt.quantize import Int8Linear, _Int8Embedding, _KernelChoice

# kernel(table, spec, reals, logits, tokens, rows, t, threads): see decode.cpp
_KERNEL = Kernel(["matvec.cpp", "decode.cpp"],
                 ["const int64_t*", "const int64_t*", "const float*", "float*", "const int64_t*",
                  "const int64_t", "const int64_t", "const int64_t"],
                 "decoding runs model.forward", prefix="#define MYGPT_MATVEC_NO_ENTRY\n")
_TIME_WEIGHTING = {None: 0, "full": 1, "circulant": 2}  # decode.cpp's TimeWeighting
_MLP = {"gelu": 0, "relu2": 1, "swiglu": 2}             # and its Mlp
# More sequences than this decode through the forward's matrix products: decode.cpp multiplies each row of x by
# each weight row in turn, which reads the weights once but stops being bound by memory as rows are added. GPT-2
# 124M's shape, greedy, 24 tokens per row, against the forward (AMD EPYC, 1 thread): 1 row 1.14x, 3 rows 1.60x,
# 4 1.38x, 5 1.17x, 8 0.80x (2 threads: 1.13x, 1.51x, 1.74x at 1, 3, 4); the seed's 3 x 512 on 2 threads: 1.80x,
# 2.10x, and 1.19x, 1.04x at 8 and 16 rows.
MAX_ROWS = 4


def pays(model, rows):
    """Whether generate should run the one-token steps of `rows` sequences of this model in decode.cpp."""
    return rows <= MAX_ROWS and unsupported(model) is None


def unsupported(model):
    """Why decode.cpp cannot run this model's steps (a short phrase), or None where it can."""
    if not isinstance(model, GPT):
        return "not a mygpt GPT"
    for name, module in model.named_modules():
        if [h for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
                if not isinstance(h, _KernelChoice)]:
            return f"forward hooks on {name or 'the model'}"
    t = model.transformer
    norms = [t.ln_f, *([t.ln_e] if model.config.embd_norm else []), *(n for b in t.h for n in (b.ln_1, b.ln_2))]
    linears = [model.lm_head, *(m for b in t.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))]
    if (not all(type(n) in (nn.LayerNorm, RMSNorm) for n in norms) or not all(type(m) in (Linear, Int8Linear)
                                                                              for m in linears)
            or type(t.wte) not in (nn.Embedding, _Int8Embedding)):
        return "layers that are not mygpt's"
    if t.wte.weight.device.type != "cpu" or t.wte.weight.dtype != torch.float32:
        return "weights not fp32 on the CPU"
    return None


class Step:
    """The C++ one-token step of one model with one KVCache, called as forward_step(model, fresh, cache) is (generate's
    step through model.forward): the logits (rows, vocab_size) of the tokens fresh (rows, 1). Its first call runs
    forward_step and lays out the table; a later one runs forward_step wherever the C++ step does not apply
    (several tokens, autograd, another autocast state than the table's)."""

    def __init__(self, model, cache, forward_step):
        self.model, self.cache, self.forward_step = model, cache, forward_step
        self.table = None      # decode.cpp's table (int64), False where it does not apply; made at the first call
        self.tensors = []      # every tensor whose address the table holds: alive as long as the table is
        self.autocast = None   # the autocast state its operands were chosen in

    def _build(self):
        """decode.cpp's table (see its header), or False where a product is not matvec's here or the cache is not
        laid out as decode.cpp reads it."""
        t, cache = self.model.transformer, self.cache
        if any(k.dtype != torch.float32 or not k.is_contiguous() for k in cache.keys + cache.values):
            return False
        linears = [self.model.lm_head]
        linears += [m for b in t.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        operands = {}
        for layer in linears:
            found = layer.one_row_operands()  # (weight, scale, bias, quantize_x) or None
            if found is None:
                return False
            weight, scale, bias, quantize_x = found
            operands[layer] = [weight.contiguous(), scale, bias, kind_of(weight, quantize_x)]
        norm = lambda n: [getattr(n, "weight", None), getattr(n, "bias", None)]  # noqa: E731 (RMSNorm has neither)
        wpe = t.wpe.weight.contiguous() if "wpe" in t else None
        entries = [t.wte.weight.contiguous(), wpe, *norm(t.ln_f), *(norm(t.ln_e) if "ln_e" in t else [None, None]),
                   *operands[self.model.lm_head]]
        for i, b in enumerate(t.h):
            a = b.attn
            kind = a.time_weighting_kind
            time = ([a.time_weighting, None] if kind == "full" else [a.time_weight, a.time_bias] if kind == "circulant"
                    else [None, None])
            extras = [*time, cache.last_input[i] if a.token_shift else None]
            if any(e is not None and (e.dtype != torch.float32 or not e.is_contiguous()) for e in extras):
                return False  # time weights or a remembered input not laid out as decode.cpp reads them
            entries += [*norm(b.ln_1), *operands[a.c_attn], *operands[a.c_proj], *norm(b.ln_2),
                        *operands[b.mlp.c_fc], *operands[b.mlp.c_proj], cache.keys[i], cache.values[i], *extras]
        self.last_inputs = list(cache.last_input)  # token shift: replaced by any forward, which a new table follows
        self.tensors = [e for e in entries if torch.is_tensor(e)]
        C = self.model.config
        self.spec = torch.tensor([C.n_layer, C.n_head, C.n_kv_head or C.n_head, C.n_embd, t.h[0].mlp.c_proj.in_features,
                                  C.vocab_size, C.block_size, _TIME_WEIGHTING[C.time_weighting], C.token_shift,
                                  C.norm == "rmsnorm", _MLP[C.mlp], C.qk_norm, C.embd_norm], dtype=torch.int64)
        self.reals = torch.tensor([C.rope_base if C.pos_emb == "rope" else 0.0, C.logit_softcap or 0.0])
        return torch.tensor([e.data_ptr() if torch.is_tensor(e) else (e or 0) for e in entries], dtype=torch.int64)

    def __call__(self, model, fresh, cache):
        autocast = torch.is_autocast_enabled("cpu")
        if self.table is None or autocast != self.autocast or (
                self.table is not False and cache.last_input[0] is not self.last_inputs[0]):
            # the first step (an int8 model measures its kernels in it), the autocast state changed, or a forward
            # ran in between (token shift's remembered inputs are new tensors then)
            logits = self.forward_step(model, fresh, cache)
            self.table = _KERNEL.get() is not None and fresh.shape[1] == 1 and self._build()
            self.autocast = autocast
            return logits
        C, t, rows = model.config, cache.length, cache.keys[0].shape[0]
        if (self.table is False or fresh.shape != (rows, 1) or fresh.dtype != torch.int64 or torch.is_grad_enabled()
                or t >= C.block_size):
            return self.forward_step(model, fresh, cache)
        if not (0 <= int(fresh) < C.vocab_size if rows == 1 else bool(((fresh >= 0) & (fresh < C.vocab_size)).all())):
            return self.forward_step(model, fresh, cache)  # which says what is wrong
        logits = torch.empty(rows, C.vocab_size)
        _KERNEL.get()(self.table, self.spec, self.reals, logits, fresh.contiguous(), rows, t, torch.get_num_threads())
        cache.length = t + 1
        return logits
