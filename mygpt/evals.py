"""
Multiple-choice scoring by log-likelihood, the way EleutherAI's lm-evaluation-harness 0.4 scores it.

An example has one context and one continuation per choice (Winogrande's contexts differ per choice instead). A
choice's score is the sum of the log-probabilities of its continuation's tokens after its context:

    acc       the choice with the largest sum is the gold one
    acc_norm  the same with each sum divided by the choice's length in characters ("lm-eval" style), or by its
              number of tokens ("llm.c" style, the completion scoring of llm.c's hellaswag.py)

Tokens, as lm-eval makes them ("lm-eval"): spaces at the end of the context move to the continuation, context +
continuation is encoded whole and split after as many tokens as the context alone encodes to, an empty context is
<|endoftext|>; the joined ids are cut from the left to block_size + 1 and the last one is dropped (it is predicted,
never read). "llm.c" encodes context and continuation separately and joins the ids.

The model never computes a position twice: the tokens that all of an example's choices begin with (the context,
mostly) go through it once, filling a KVCache that is then copied to one row per choice, and only the choices'
remaining tokens are fed, in one padded batch. Examples whose shared part has the same length share a batch, and the
head (vocab_size x n_embd, often the largest matrix) scores only the positions whose predictions are read.
"""

import copy
from contextlib import contextmanager
from typing import NamedTuple

import torch
from tqdm import tqdm

from mygpt.model import KVCache

STYLES = ("lm-eval", "llm.c")


class Example(NamedTuple):
    """One multiple-choice question, as text."""
    contexts: tuple       # per choice (the same string for most tasks)
    continuations: tuple  # per choice, with the leading space lm-eval's target_delimiter adds
    gold: int             # index of the right choice
    chars: tuple          # per choice, the characters lm-eval's acc_norm divides by (the choice without the space)


class _Row(NamedTuple):
    """One choice of one example, as the model reads it."""
    example: int  # index of its example in the batch of examples
    ids: list     # input tokens, at most block_size: context + continuation[:-1], cut from the left
    targets: list  # the continuation's tokens: the predictions at the last len(targets) positions of ids


def _encode_pair(tokenizer, context, continuation, style="lm-eval"):
    """(context ids, continuation ids) as lm-eval's HFLM makes them for a causal model, or as llm.c does."""
    if context == "":  # lm-eval conditions on <|endoftext|> (its prefix token) instead of nothing
        if tokenizer.eot_token is None:
            raise ValueError(f"an empty context needs <|endoftext|> to condition on, which the tokenizer "
                             f"({tokenizer.name}) lacks")
        ids = tokenizer.encode(continuation)
        return ([tokenizer.eot_token], ids) if ids[:1] != [tokenizer.eot_token] else (ids[:1], ids[1:])
    if style == "llm.c":
        return tokenizer.encode(context), tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:  # a word's leading space belongs to its token, which the continuation holds
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def encode_examples(tokenizer, examples, style="lm-eval", where=None):
    """Per example, the (context ids, continuation ids) of each choice, all encoded before the model runs, so that
    text the tokenizer cannot hold is refused before any time is spent. where(i) names example i in errors."""
    check_style(style)
    where = where or (lambda i: f"example {i}")
    encoded = []
    for i, example in enumerate(examples):
        pairs = []
        for context, continuation in zip(example.contexts, example.continuations):
            try:
                pair = _encode_pair(tokenizer, context, continuation, style)
            except ValueError as err:
                raise ValueError(f"{where(i)}: the checkpoint's tokenizer ({tokenizer.name}) cannot encode it "
                                 f"({err}); these tasks need a model with a byte-level tokenizer such as GPT-2's "
                                 f"BPE (--tokenizer gpt2 when preparing its corpus)") from None
            if not pair[1]:
                raise ValueError(f"{where(i)}: a choice's continuation {continuation!r} encodes to no tokens")
            pairs.append(pair)
        encoded.append(pairs)
    return encoded


def check_style(style):
    if style not in STYLES:
        raise ValueError(f"unknown scoring style {style!r}; choose one of {', '.join(STYLES)}")


# ---------------------------------------------------------------- log-likelihoods

@torch.inference_mode()
def loglikelihoods(model, encoded, batch_size=32, device="cpu", progress=False, where=None):
    """Per example, per choice: the summed log-probability (nats, float) of the continuation's tokens after its
    context. encoded is what encode_examples returns; batch_size counts choices (rows) per forward pass; where(i)
    names example i in errors."""
    where = where or (lambda i: f"example {i}")
    examples = [[_to_row(e, ctx, cont, model.block_size, where) for ctx, cont in pairs]
                for e, pairs in enumerate(encoded)]
    shared = [_common_prefix([r.ids for r in rows]) for rows in examples]
    sums = [None] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(examples), unit="example", disable=not progress or None, leave=False) as bar:
            for group in _batches(examples, shared, batch_size):
                values = _score_rows(model, [examples[e] for e in group], shared[group[0]], device)
                for e in group:
                    sums[e], values = values[:len(examples[e])], values[len(examples[e]):]
                bar.update(len(group))
    finally:
        model.train(was_training)
    return sums


def _to_row(example, context, continuation, block_size, where):
    if len(continuation) > block_size:  # lm-eval asserts the same
        raise ValueError(f"{where(example)}: a continuation of {len(continuation)} tokens does not fit the model's "
                         f"block_size {block_size}; leave the row out or use a model with a longer block_size")
    whole = (context + continuation)[-(block_size + 1):]  # lm-eval's cut: the continuation is always kept whole
    if len(whole) < 2:
        raise ValueError(f"{where(example)}: its context encodes to no tokens, so nothing predicts the "
                         f"continuation's first one")
    return _Row(example, whole[:-1], continuation)


def _common_prefix(sequences):
    """The number of leading tokens all the sequences share: computed once for all of them."""
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = sequences[0][i]
        if any(s[i] != token for s in sequences):
            return i
    return n


def _batches(examples, shared, batch_size):
    """Lists of example indices; those in one list share a prefix of the same length (they are fed together) and
    hold at most batch_size rows, or one example if it alone has more. Sorted by length to waste little padding."""
    order = sorted(range(len(examples)), key=lambda e: (shared[e], max(len(r.ids) for r in examples[e])))
    group, rows = [], 0
    for e in order:
        n = len(examples[e])
        if group and (shared[e] != shared[group[0]] or rows + n > batch_size):
            yield group
            group, rows = [], 0
        group.append(e)
        rows += n
    if group:
        yield group


def _score_rows(model, examples, p, device):
    """The summed log-probability of each row's targets, for the rows of the examples in order; each example's rows
    share their first p input tokens."""
    rows = [row for rows in examples for row in rows]
    owner = [i for i, rows in enumerate(examples) for _ in rows]  # row -> its example here
    width = max(len(r.ids) for r in rows) - p  # the rows' padded length after the shared prefix
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    cache = None
    if p:
        prefixes = torch.tensor([rows[0].ids[:p] for rows in examples], device=device)  # (examples, p)
        cache = _new_cache(model, len(examples), p + width, device)
        _add_logprobs(sums, model, prefixes, cache, _read(rows, 0, p, owner), device)
        _expand(cache, torch.tensor(owner, device=device))
    if width > 0:
        suffixes = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # right-padded: causal attention
        for r, row in enumerate(rows):                                             # keeps the padding out of view
            suffixes[r, :len(row.ids) - p] = torch.tensor(row.ids[p:])
        _add_logprobs(sums, model, suffixes, cache, _read(rows, p, None, range(len(rows))), device)
    return sums.tolist()


def _read(rows, first, end, batch_rows):
    """Which predictions of a forward pass over positions [first, end) of the rows (end None: to each row's end) are
    read, as four lists: the row, its row in the pass's input, the position there, and the token to predict."""
    row_ids, batch_row, at, token = [], [], [], []
    for r, row in enumerate(rows):
        following = row.ids[1:] + row.targets[-1:]  # the token each input position predicts
        start = len(row.ids) - len(row.targets)  # the first position whose prediction is read
        for j in range(max(start, first), len(row.ids) if end is None else min(len(row.ids), end)):
            row_ids.append(r)
            batch_row.append(batch_rows[r])
            at.append(j - first)
            token.append(following[j])
    return row_ids, batch_row, at, token


def _add_logprobs(sums, model, idx, cache, reading, device):
    """Run idx (B, T) through the model (after the cache's positions) and add the log-probability of each read token
    to its row's sum."""
    row, batch_row, at, token = (torch.tensor(x, dtype=torch.long, device=device) for x in reading)
    if not len(row):  # nothing read in this pass: it only fills the cache
        batch_row, at = batch_row.new_zeros(1), at.new_zeros(1)
    with _head_at(model, batch_row, at):
        logits = model(idx, kv_cache=cache)[0].float()  # (read, vocab_size)
    if len(row):
        logprobs = logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(-1)  # (read,)
        sums.index_add_(0, row, logprobs.double())


def _new_cache(model, batch, length, device):
    """A KVCache holding `length` positions instead of block_size: a batch of rows times block_size would be large."""
    config = copy.copy(model.config)
    config.block_size = length
    embedding = model.transformer.wte.weight  # the model's dtype (int8: its dequantized copy)
    return KVCache(config, batch, device, embedding.dtype)


def _expand(cache, owner):
    """Copy row owner[r] of each tensor of the cache to row r: each choice continues its example's prefix."""
    cache.keys = [k.index_select(0, owner) for k in cache.keys]
    cache.values = [v.index_select(0, owner) for v in cache.values]
    cache.last_input = [x if x is None else x.index_select(0, owner) for x in cache.last_input]


@contextmanager
def _head_at(model, rows, positions):
    """Let the model's head score the positions (rows[i], positions[i]) of its input only, giving logits (N,
    vocab_size): GPT.forward scores every position, while only the continuations' predictions are read, and with
    GPT-2's vocabulary the head costs more than the blocks of a small model."""
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0][rows, positions],))
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- accuracy

def accuracy(examples, encoded, sums, style="lm-eval"):
    """{"n", "acc", "acc_norm"} of the choices' summed log-probabilities against the gold answers. Ties go to the
    first choice, as numpy's argmax gives them in lm-eval."""
    check_style(style)
    if not examples:
        raise ValueError("no examples to score: accuracy over nothing is undefined")
    hits = hits_norm = 0
    for example, pairs, lls in zip(examples, encoded, sums):
        lengths = [len(cont) for _, cont in pairs] if style == "llm.c" else example.chars
        hits += _argmax(lls) == example.gold
        hits_norm += _argmax([ll / n for ll, n in zip(lls, lengths)]) == example.gold
    return {"n": len(examples), "acc": hits / len(examples), "acc_norm": hits_norm / len(examples)}


def _argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal values


def score_examples(model, tokenizer, examples, style="lm-eval", batch_size=32, device="cpu", progress=False,
                   where=None):
    """{"n", "acc", "acc_norm"} of model on the examples (a list of Example), tokenized with tokenizer (as
    mygpt.tokenizer.load_tokenizer gives it) in the given style."""
    examples = list(examples)
    encoded = encode_examples(tokenizer, examples, style, where)
    if not examples:
        raise ValueError("no examples to score: accuracy over nothing is undefined")
    sums = loglikelihoods(model, encoded, batch_size, device, progress)
    return accuracy(examples, encoded, sums, style)
