"""
Decoding's one-token step in one call to C++ (mygpt/decode.cpp), for models of GPT-2's architecture on the CPU.

model.forward's one-token step of GPT-2 124M calls ~25 PyTorch operations a block around its products (norms,
views, the cache's copies, attention, GELU, residuals); their dispatch in Python cost 1.6-1.9 ms a token on one
thread of an AMD EPYC, a fifth of the int8 step, where llama.cpp's step is all C. decode.cpp does the whole step
(embeddings, every block, the head) in one call, with the products of mygpt/matvec.cpp and each Linear's own
operands (one_row_operands: fp32, its bf16 copy inside bf16_weight_copies(), int8 with the kernel its measurement
chose), writing the keys and values into the same KVCache, so the prompt's pass (model.forward) and the C++ steps
share one cache. GPT-2 124M's step then costs what its products cost (see the README's *Decoding against
llama.cpp*).

stream() and generate() take it for every one-token step with a cache, batch 1, on the CPU, no autograd, where
`unsupported(model)` is None: learned positions or none, LayerNorm, GELU, multi-head attention with or without
the seed's time weighting and token shift, and none of rotary positions, QK-norm, grouped-query attention,
soft-capped logits, an embedding norm or hooks.
Other models, compile=True and a kernel that cannot be built keep model.forward. The first one-token step of a
generation runs model.forward too: an int8 model measures its kernels there, which the C++ step then uses.
"""

import torch
import torch.nn as nn

from mygpt.matvec import _KINDS, QUANTIZED_X, Kernel
from mygpt.model import GPT, Linear
from mygpt.quantize import Int8Linear, _Int8Embedding, _KernelChoice

_KERNEL = Kernel(["matvec.cpp", "decode.cpp"], ["const int64_t*", "float*"] + ["const int64_t"] * 11,
                 "decoding runs model.forward", prefix="#define MYGPT_MATVEC_NO_ENTRY\n")
_TIME_WEIGHTING = {None: 0, "full": 1, "circulant": 2}  # decode.cpp's TimeWeighting


def unsupported(model):
    """Why decode.cpp cannot run this model's steps (a short phrase), or None where it can."""
    if not isinstance(model, GPT):
        return "not a mygpt GPT"
    C = model.config
    features = dict(pos_emb=C.pos_emb in ("learned", None), norm=C.norm == "layernorm", mlp=C.mlp == "gelu",
                    n_kv_head=(C.n_kv_head or C.n_head) == C.n_head, qk_norm=not C.qk_norm,
                    logit_softcap=C.logit_softcap is None, embd_norm=not C.embd_norm)
    missing = [name for name, ok in features.items() if not ok]
    if missing:
        return f"its config's {', '.join(missing)}"
    for name, module in model.named_modules():
        if [h for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
                if not isinstance(h, _KernelChoice)]:
            return f"forward hooks on {name or 'the model'}"
    t = model.transformer
    for block in t.h:
        if not all(isinstance(n, nn.LayerNorm) for n in (block.ln_1, block.ln_2)) or not all(
                type(m) in (Linear, Int8Linear) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                           block.mlp.c_proj)):
            return "a block's layers are not mygpt's"
    if type(model.lm_head) not in (Linear, Int8Linear) or type(t.wte) not in (nn.Embedding, _Int8Embedding):
        return "its head or embedding is not mygpt's"
    if t.wte.weight.device.type != "cpu" or t.wte.weight.dtype != torch.float32:
        return "weights not fp32 on the CPU"
    return None


class Step:
    """The C++ one-token step of one model with one KVCache, called as forward_step(model, fresh, cache) is (generate's
    step through model.forward): the logits (1, vocab_size) of the token fresh (1, 1). Its first call runs
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
        if any(k.dtype != torch.float32 or k.shape[0] != 1 or not k.is_contiguous() for k in cache.keys + cache.values):
            return False
        linears = [self.model.lm_head]
        linears += [m for b in t.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        operands = {}
        for layer in linears:
            found = layer.one_row_operands()  # (weight, scale, bias, quantize_x) or None
            if found is None:
                return False
            weight, scale, bias, quantize_x = found
            operands[layer] = [weight.contiguous(), scale, bias, QUANTIZED_X if quantize_x else _KINDS[weight.dtype]]
        wpe = t.wpe.weight.contiguous() if "wpe" in t else None
        entries = [t.wte.weight.contiguous(), wpe, t.ln_f.weight, t.ln_f.bias, *operands[self.model.lm_head]]
        for i, b in enumerate(t.h):
            a = b.attn
            time = {"full": (getattr(a, "time_weighting", None), None),
                    "circulant": (getattr(a, "time_weight", None), getattr(a, "time_bias", None))}
            extras = [*time.get(a.time_weighting_kind, (None, None)), cache.last_input[i] if a.token_shift else None]
            if any(e is not None and (e.dtype != torch.float32 or not e.is_contiguous()) for e in extras):
                return False  # time weights or a remembered input not laid out as decode.cpp reads them
            entries += [b.ln_1.weight, b.ln_1.bias, *operands[a.c_attn], *operands[a.c_proj],
                        b.ln_2.weight, b.ln_2.bias, *operands[b.mlp.c_fc], *operands[b.mlp.c_proj],
                        cache.keys[i], cache.values[i], *extras]
        self.last_inputs = list(cache.last_input)  # token shift: replaced by any forward, which a new table follows
        self.tensors = [e for e in entries if torch.is_tensor(e)]
        self.hidden = t.h[0].mlp.c_fc.out_features
        return torch.tensor([e.data_ptr() if torch.is_tensor(e) else (e or 0) for e in entries], dtype=torch.int64)

    def __call__(self, model, fresh, cache):
        autocast = torch.is_autocast_enabled("cpu")
        if self.table is None or autocast != self.autocast or (
                self.table is not False and cache.last_input[0] is not self.last_inputs[0]):
            # the first step (an int8 model measures its kernels in it), the autocast state changed, or a forward
            # ran in between (token shift's remembered inputs are new tensors then)
            logits = self.forward_step(model, fresh, cache)
            self.table = _KERNEL.get() is not None and fresh.shape == (1, 1) and self._build()
            self.autocast = autocast
            return logits
        C, t = model.config, cache.length
        if self.table is False or fresh.shape != (1, 1) or torch.is_grad_enabled() or t >= C.block_size:
            return self.forward_step(model, fresh, cache)
        token = int(fresh)
        if not 0 <= token < C.vocab_size:
            return self.forward_step(model, fresh, cache)  # which says what is wrong
        logits = torch.empty(1, C.vocab_size)
        _KERNEL.get()(self.table, logits, token, t, C.n_layer, C.n_head, C.n_embd, self.hidden, C.vocab_size,
                      C.block_size, _TIME_WEIGHTING[C.time_weighting], int(C.token_shift), torch.get_num_threads())
        cache.length = t + 1
        return logits
