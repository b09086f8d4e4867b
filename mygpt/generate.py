"""
Sampling from a GPT, with a key/value cache.

Without a cache every new token re-runs the model over the whole sequence. With one, the keys and
values of the tokens already seen are kept per layer, and each step feeds only the newest token.
Time-weighted attention fits the cache because its weights are indexed by absolute position: the
new token at position t uses row t of the weight matrix.

Once a sequence is longer than block_size the model only ever sees the last block_size tokens,
and every one of them changes position with each new token. Cached keys then no longer match, so
from that point each step re-runs the window: the tokens stay exactly those of uncached generation.
"""

import torch


class KVCache:
    """Keys and values of every layer for positions 0..length-1, in preallocated buffers."""

    def __init__(self, config, batch_size, device, dtype):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_size)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        # token shift needs the previous position's attention input in every layer
        self.last_input = [None] * config.n_layer
        self.length = 0

    def store(self, layer, k, v):
        """Append k, v (B, nh, T, hs) at the current length; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def attention_step(attn, x, cache, layer):
    """CausalSelfAttention.forward for the tokens x that follow the cached ones."""
    start = cache.length
    if attn.token_shift:
        previous = cache.last_input[layer]
        cache.last_input[layer] = x[:, -1:]
        x = attn.shift(x, previous)
    q, k, v = attn.qkv(x)
    k, v = cache.store(layer, k, v)
    y = attn.attend(q, k, v, attn.weights(start + x.shape[1], first_row=start))
    return attn.resid_drop(attn.c_proj(attn.merge_heads(y)))


def last_logits_cached(model, idx, cache):
    """Logits of the last position of idx, given that the cache holds everything before idx."""
    x = model.embed(idx, start=cache.length)
    for layer, block in enumerate(model.transformer.h):
        x = x + attention_step(block.attn, block.ln_1(x), cache, layer)
        x = x + block.mlp(block.ln_2(x))
    cache.length += idx.shape[1]
    return model.lm_head(model.transformer.ln_f(x[:, -1]))


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top k and outside the smallest set holding top_p of the mass."""
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the probability
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits, temperature, do_sample, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def check_sampling_args(max_new_tokens, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def generate(model, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, top_p=None,
             use_cache=True, generator=None):
    """Append max_new_tokens tokens to each row of idx (B, T) and return the (B, T + max_new_tokens) result.

    Greedy by default; do_sample=True draws from softmax(logits / temperature), optionally limited
    to the top_k tokens and/or the top_p nucleus. The model runs in eval mode (no dropout) and is
    put back in its previous mode afterwards.
    """
    check_sampling_args(max_new_tokens, top_k, top_p)
    model.check_input(idx[:, -model.block_size:])
    was_training = model.training
    model.eval()
    try:
        out = sample_tokens(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p, use_cache, generator)
    finally:
        model.train(was_training)
    # a copy made outside inference mode is an ordinary tensor, usable as input to training
    return out.clone()


@torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all, which matters one token at a time
def sample_tokens(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p, use_cache, generator):
    block_size = model.block_size
    cache = None
    if use_cache and idx.shape[1] < block_size:
        weight = model.lm_head.weight
        cache = KVCache(model.config, idx.shape[0], weight.device, weight.dtype)
    for _ in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= block_size:
            fresh = idx[:, cache.length:]  # the whole prompt first, then one token per step
            logits = last_logits_cached(model, fresh, cache)
        else:
            logits = model(idx[:, -block_size:])[0][:, -1]
        idx = torch.cat([idx, next_token(logits, temperature, do_sample, top_k, top_p, generator)], dim=1)
    return idx
