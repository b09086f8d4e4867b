"""
The GPT language model, written to be read top to bottom:

    GELU -> CausalSelfAttention (optionally time-weighted) -> MLP -> Block -> GPT

Parameter names follow OpenAI's GPT-2 layout (transformer.wte, transformer.h.0.attn.c_attn, ...)
so that GPT-2 checkpoints load by name. Sampling with a key/value cache lives in mygpt/generate.py.

Time-weighted attention (from the seed document) rescales the attention probabilities after the
softmax by a learned weight per (head, query position t, key position u):

    y = dropout(softmax(q k^T / sqrt(d) + causal mask) * W) @ v

'full' learns W directly, shape (n_head, block_size, block_size). 'circulant' makes W depend
mostly on the distance t - u, with a per-key correction for early tokens:

    W[h, t, u] = time_weight[h, block_size - 1 - (t - u)] * time_bias[h, 0, u]   for u <= t
    W[h, t, u] = 0                                                                for u >  t

All weights start at 1, so a fresh time-weighted model computes exactly what a vanilla one does.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mygpt.utils import CfgNode

TIME_WEIGHTINGS = (None, "full", "circulant")

# (n_layer, n_head, n_embd) of the named model shapes
MODEL_SHAPES = {
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


def gelu(x):
    """GELU in the tanh approximation that GPT-2 was trained with."""
    return F.gelu(x, approximate="tanh")


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


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention, with optional time weighting of the probabilities."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_pdrop = config.attn_pdrop
        self.resid_drop = nn.Dropout(config.resid_pdrop)
        self.token_shift = config.token_shift
        self.time_weighting_kind = config.time_weighting
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

    def shift(self, x, previous=None):
        """Token shift: the first half of the channels come from the previous position.

        `previous` is the (B, 1, C) input of the position before x[:, 0] (zeros at the start).
        """
        half = self.n_embd // 2
        if previous is None:
            previous = x.new_zeros(x.shape[0], 1, x.shape[2])
        shifted = torch.cat([previous[:, :, :half], x[:, :-1, :half]], dim=1)
        return torch.cat([shifted, x[:, :, half:]], dim=2)

    def split_heads(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def qkv(self, x):
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def attend(self, q, k, v, W):
        """softmax(q k^T / sqrt(d), causal) [* W] -> dropout -> @ v, for queries at the last positions.

        q covers the last Tq of the Tk key positions; W, when given, is the (n_head, Tq, Tk) slice
        of the time-weighting matrix for exactly those query rows.
        """
        dropout = self.attn_pdrop if self.training else 0.0
        Tq, Tk = q.shape[2], k.shape[2]
        # The fused kernels cannot apply weights after the softmax, and on the CPU they have no
        # dropout (PyTorch then falls back to a path slower than the one below).
        if W is None and (dropout == 0.0 or q.device.type != "cpu") and Tq in (1, Tk):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=Tq == Tk)
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

    def merge_heads(self, y):
        B, nh, T, hs = y.shape
        return y.transpose(1, 2).reshape(B, T, nh * hs)

    def forward(self, x):
        if self.token_shift:
            x = self.shift(x)
        q, k, v = self.qkv(x)
        y = self.attend(q, k, v, self.weights(x.shape[1]))
        return self.resid_drop(self.c_proj(self.merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT language model: token (+ position) embeddings, n_layer blocks, a final LayerNorm and a linear head."""

    @staticmethod
    def get_default_config():
        C = CfgNode()
        # either model_type or (n_layer, n_head, n_embd) must be given
        C.model_type = "gpt-mini"
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
        C.time_weighting = None      # None, 'full' or 'circulant'
        C.token_shift = False        # the seed's companion trick to time weighting
        C.pos_emb = True             # learned absolute positions; time weighting can replace them
        return C

    def __init__(self, config):
        super().__init__()
        config = resolve_config(config)
        self.config = config
        self.block_size = config.block_size
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        )
        if config.pos_emb:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: each block adds two residual branches, so their output projections start smaller
        # to keep the variance of the residual stream from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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
        n = sum(p.numel() for p in self.parameters())
        if not include_position_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def check_input(self, idx):
        """Raise a clear error for token ids the model cannot take."""
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids (e.g. torch.long), got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than block_size {self.block_size}; "
                             f"crop it to the last {self.block_size} tokens or build the model with a larger block_size")
        if idx.shape[1] == 0:
            raise ValueError("idx holds an empty sequence; give at least one token")
        if torch.compiler.is_compiling():
            return  # a data-dependent check would break the compiled graph
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one pass, and one device sync on a GPU
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def embed(self, idx, start=0):
        """Token embeddings plus position embeddings for positions start, start+1, ..."""
        x = self.transformer.wte(idx)
        if self.config.pos_emb:
            pos = torch.arange(start, start + idx.shape[1], device=idx.device)
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def forward(self, idx, targets=None):
        """Logits for every position, and the mean cross-entropy over targets != -1 when given."""
        self.check_input(idx)
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, train_config):
        """AdamW that decays only the weights of Linear layers.

        Biases and LayerNorm gains have no reason to shrink, embeddings are lookups, and the time
        weights start at 1 (a decay toward 0 would switch attention off), so none of those decay.
        """
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": train_config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel updates all parameters in one pass: the same maths, less time.
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters())
        return torch.optim.AdamW(groups, lr=train_config.learning_rate, betas=train_config.betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Continue each sequence of idx (B, T) by max_new_tokens tokens; see mygpt.generate."""
        from mygpt.generate import generate
        return generate(self, idx, max_new_tokens, temperature=temperature, do_sample=do_sample,
                        top_k=top_k, top_p=top_p, use_cache=use_cache, generator=generator)

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """A GPT with OpenAI GPT-2 weights, read through Hugging Face transformers; see mygpt.pretrained."""
        from mygpt.pretrained import load_gpt2
        return load_gpt2(cls, name_or_dir, **overrides)


def resolve_config(config):
    """Fill n_layer/n_head/n_embd from model_type and check the config, with errors that say what to fix."""
    config = CfgNode(**config.to_dict())
    shape_given = all(getattr(config, k) is not None for k in ("n_layer", "n_head", "n_embd"))
    if config.model_type is not None:
        if config.model_type not in MODEL_SHAPES:
            raise ValueError(f"unknown model_type {config.model_type!r}; choose one of {sorted(MODEL_SHAPES)} "
                             f"or set model_type=None and give n_layer, n_head and n_embd")
        if shape_given:
            raise ValueError("give either model_type or all of n_layer, n_head, n_embd, not both "
                             "(set model_type=None to use your own shape)")
        config.n_layer, config.n_head, config.n_embd = MODEL_SHAPES[config.model_type]
    elif not shape_given:
        raise ValueError("model_type is None, so n_layer, n_head and n_embd must all be set")
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        value = getattr(config, key)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}) "
                         f"so that every head gets n_embd // n_head channels")
    if config.time_weighting not in TIME_WEIGHTINGS:
        raise ValueError(f"unknown time_weighting {config.time_weighting!r}; choose None, 'full' or 'circulant'")
    return config
