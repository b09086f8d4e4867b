"""
Sampling from a GPT: this file only drives GPT.forward, whose KVCache lets each step feed just the
newest token. Time-weighted attention fits the cache because its weights are indexed by absolute
position: the new token at position t uses row t of the weight matrix.

Once a sequence is longer than block_size the model only ever sees the last block_size tokens,
and every one of them changes position with each new token. Cached keys then no longer match, so
from that point each step re-runs the window: the tokens stay exactly those of uncached generation.

compile=True compiles the one-token step (_decode_step) with torch.compile. The cache is preallocated for
block_size positions and a step reads the first `length` of them; compiled with dynamic=True, that length
is a symbol, so one graph serves every step as the cache grows (no recompiles, and no work on empty
slots, which a fixed-size cache with a length mask would do). The prompt, the step that fills the cache's
last slot (its full view is laid out as no other step's, and would be compiled again) and the steps past
block_size run eagerly. A compile that fails falls back to eager mode with one line of warning
(mygpt/compiled.py), remembered per model.

Without compile, for one or a few sequences on the CPU, each one-token step after the first runs in C++ as a whole
(mygpt/decode.py; the same arithmetic in one call, without Python between operations).

Only the last section knows about text: where a sample starts without a prompt, a prompt's ids and whole
samples decoded to text, the rules that `mygpt sample` and the projects share.
"""

import numbers
import weakref

import torch

from mygpt import decode
from mygpt.compiled import Compiled
from mygpt.model import KVCache

_COMPILED_STEPS = weakref.WeakKeyDictionary()  # model -> its Compiled _decode_step, kept across calls


def _filter_logits(logits, top_k=None, top_p=None):
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


def _next_token(logits, temperature, do_sample, top_k, top_p, generator):
    """The next token (B, 1) from the last position's logits (B, vocab_size)."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    logits = _filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def check_sampling_args(max_new_tokens, temperature, do_sample, top_k, top_p, stop_tokens):
    """Raise a ValueError (a TypeError for stop_tokens) naming the first of stream's sampling arguments that is
    out of range, before any token is drawn; the projects call it on their own arguments the same way."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be positive when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if stop_tokens is not None and not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in stop_tokens):
        raise TypeError(f"stop_tokens must be a list of token ids, got {stop_tokens!r}")


def stream(model, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, top_p=None,
           use_cache=True, generator=None, stop_tokens=None, compile=False):
    """Yield the next token of every row of idx (B, T) as a (B, 1) tensor, up to max_new_tokens times.

    Greedy by default; do_sample=True draws from softmax(logits / temperature), optionally limited
    to the top_k tokens and/or the top_p nucleus. With stop_tokens, a row that has produced one of
    them repeats it from then on, and the stream ends once every row has. The model runs in eval
    mode (no dropout) and is put back in its previous mode when the stream ends or is closed.
    compile=True compiles the cached one-token step (see the module's docstring).
    """
    for idx in _extend(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p, use_cache, generator,
                       stop_tokens, compile):
        yield idx[:, -1:].clone()  # a copy made outside inference mode is an ordinary tensor


def generate(model, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, top_p=None,
             use_cache=True, generator=None, stop_tokens=None, compile=False):
    """idx (B, T) followed by up to max_new_tokens tokens per row: (B, T + n); see stream for the arguments.

    With stop_tokens, generation ends early once every row has produced one.
    """
    out = idx
    for out in _extend(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p, use_cache, generator,
                       stop_tokens, compile):
        pass
    return out.clone()  # an ordinary tensor (not an inference-mode one), usable as input to training


def _extend(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p, use_cache, generator, stop_tokens,
            compile):
    """Yield idx with one more token per row, max_new_tokens times (or until every row has stopped)."""
    check_sampling_args(max_new_tokens, temperature, do_sample, top_k, top_p, stop_tokens)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    model.check_input(idx[..., -model.block_size:] if torch.is_tensor(idx) else idx)  # the window it will see
    was_training = model.training
    model.eval()
    try:
        yield from _sample_tokens(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p,
                                  use_cache, generator, stop_tokens, compile)
    finally:
        model.train(was_training)


def _decode_step(model, fresh, cache):
    """The logits (B, vocab_size) of the last of the tokens fresh (B, T) that follow the cached positions."""
    return model(fresh, kv_cache=cache)[0][:, -1]


def _compiled_decode_step(model):
    """_decode_step compiled (or eager, once a compile failed) for this model, kept for its next calls."""
    if model not in _COMPILED_STEPS:
        # fullgraph: a step that cannot be compiled whole fails before any of it runs, leaving the cache as it was
        _COMPILED_STEPS[model] = Compiled(_decode_step, "the decode step", fullgraph=True, dynamic=True)
    return _COMPILED_STEPS[model]


def _sample_tokens(model, idx, max_new_tokens, temperature, do_sample, top_k, top_p, use_cache, generator,
                   stop_tokens, compile):
    block_size = model.block_size
    cache = None
    if use_cache and idx.shape[1] < block_size:
        embedding = model.transformer.wte.weight  # the model's device and dtype (int8: its dequantized copy)
        cache = KVCache(model.config, idx.shape[0], embedding.device, embedding.dtype)
    step = _decode_step
    if cache is not None and compile:
        step = _compiled_decode_step(model)
    elif cache is not None and idx.device.type == "cpu" and decode.pays(model, idx.shape[0]):
        step = decode.Step(model, cache, _decode_step)  # the whole one-token step in C++
    stops = None if not stop_tokens else torch.tensor(stop_tokens, device=idx.device)
    stopped = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        # inference mode: no autograd bookkeeping at all, which matters one token at a time
        with torch.inference_mode():
            if cache is not None and idx.shape[1] <= block_size:
                # the whole prompt first, then one token per step (a copy, laid out alike at every step)
                fresh = idx[:, cache.length:].contiguous()
                logits = (step if 0 < cache.length < block_size - 1 else _decode_step)(model, fresh, cache)
            else:
                logits = model(idx[:, -block_size:])[0][:, -1]
            token = _next_token(logits, temperature, do_sample, top_k, top_p, generator)  # (B, 1)
            if stops is not None:
                token = torch.where(stopped, idx[:, -1:], token)  # a stopped row repeats its stop token
                stopped = stopped | torch.isin(token, stops)
            idx = torch.cat([idx, token], dim=1)
        yield idx
        if stops is not None and bool(stopped.all()):
            return


# ---------------------------------------------------------------- text in, text out: the CLI's and the projects'

SAMPLE_SEPARATOR = "-" * 40  # between printed samples, as nanoGPT's sample.py prints them


def document_start(tokenizer, note=print):
    """(ids, text) where a sample starts without a prompt, the one rule of `mygpt sample` and the projects: a new
    document, at <|endoftext|> where the tokenizer has it (as GPT-2's samples start; its text is empty), else at a
    newline (as nanoGPT's character samples do), else at the vocabulary's first character, with a note."""
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token], ""
    try:
        return tokenizer.encode("\n"), "\n"
    except ValueError:  # a character vocabulary without a newline
        text = tokenizer.decode([0])
        note(f"the vocabulary has no newline to start a sample from: samples start from {text!r} instead")
        return [0], text


def prompt_ids(tokenizer, prompt):
    """The prompt's token ids; an empty prompt starts a new document (document_start)."""
    if not prompt:
        return document_start(tokenizer)[0]
    try:
        return tokenizer.encode(prompt)
    except ValueError as err:
        raise ValueError(f"--prompt: {err}") from None


def generate_texts(model, tokenizer, prompt, length, temperature=1.0, top_k=None, top_p=None, num_samples=1,
                   generator=None, stop=True):
    """num_samples continuations of prompt by up to length tokens, each as prompt + the decoded new text; tokenizer
    has encode, decode and eot_token, as mygpt.load_tokenizer returns.

    The samples are drawn together, one row each; a row ends at <|endoftext|> (not shown) when stop is True.
    """
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)  # an empty prompt starts a new document (<|endoftext|> for GPT-2)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    eot = tokenizer.eot_token
    stops = [eot] if stop and eot is not None else None
    out = generate(model, idx, length, temperature=temperature, do_sample=True, top_k=top_k, top_p=top_p,
                   generator=generator, stop_tokens=stops)
    texts = []
    for row in out[:, idx.shape[1]:].tolist():
        if stops and eot in row:
            row = row[:row.index(eot)]
        texts.append(prompt + tokenizer.decode(row))
    return texts
