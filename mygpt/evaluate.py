"""
Scoring a model on token windows: the summed loss in nats, the number of targets and the UTF-8 bytes they
decode to. Loss per token = nats / targets, perplexity = exp(that), and bits per byte = nats / ln 2 / bytes,
which compares models with different tokenizers (a special token counts as the bytes of its text).

`score_batches` is the one loop that turns a model and batches into these sums: the Trainer's evaluation runs
it on the batches of its validation set, and `score` (what `mygpt eval` and projects/gpt2 call) on the first
windows of a corpus.
"""

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch

from mygpt import precision as _precision
from mygpt.inference import inference_precision
from mygpt.model import bf16_weight_copies
from mygpt.precision import PRECISIONS


class Score(NamedTuple):
    """Sums over the scored targets (and the windows that held them); the figures follow from them."""
    nats: float     # summed cross-entropy of the targets
    targets: int    # targets scored (y >= 0)
    nbytes: int     # UTF-8 bytes the targets decode to (0 when no tokenizer counted them)
    windows: int    # rows of the batches

    @property
    def loss(self):
        """Mean loss in nats per target; NaN without targets."""
        return self.nats / self.targets if self.targets else math.nan

    @property
    def bits_per_byte(self):
        """nats / ln 2 / bytes; NaN without bytes."""
        return self.nats / math.log(2) / self.nbytes if self.nbytes else math.nan


@contextmanager
def _eval_mode(model):
    """model without dropout inside the block, back in its own mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def score_batches(model, batches, device="cpu", dtype=None, tokenizer=None):
    """The Score of model over batches: (x, y) pairs of (B, T) token ids on the host, y = -1 where nothing is
    predicted. dtype: autocast's (torch.bfloat16 or torch.float16), None for fp32. tokenizer (decode_bytes, as
    mygpt.load_tokenizer returns) counts the bytes of the targets for bits per byte.

    Every batch goes through the model, also one without targets: under FSDP each forward is collective.
    """
    device = torch.device(device)
    nats, targets, nbytes, windows = 0.0, 0, 0, 0
    with _eval_mode(model):
        for x, y in batches:
            count = int((y >= 0).sum())  # on the host: no device sync
            with _precision.autocast(device.type, dtype):
                _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            windows += len(x)
            if count:
                nats += loss.double().item() * count  # the model's mean over this batch's targets, back to a sum
                targets += count
                if tokenizer is not None:
                    nbytes += len(tokenizer.decode_bytes(y[y >= 0].tolist()))
    return Score(nats, targets, nbytes, windows)


def score(model, windows, batch_size, max_batches=None, device="cpu", precision="fp32", tokenizer=None):
    """The Score of model over the first windows of a corpus, batch_size at a time: all of them, or max_batches
    batches. windows has get_batch(indices) -> (x, y), as mygpt.TokenDataset; tokenizer counts the bytes (see
    score_batches). precision: 'fp32', 'bf16', 'fp16' (autocast) or 'auto' (mygpt.inference_precision's choice,
    as `mygpt eval` makes it: bf16 where it is native and faster on this model's forward on the first batch).
    """
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of {[*PRECISIONS, 'auto']}, got {precision!r}")
    n = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    if precision == "auto":
        precision = _auto_precision(model, windows.get_batch(batches[0]), device) if batches else "fp32"
    with bf16_weight_copies():  # bf16: each large Linear's weights cast once for all the batches, not per call
        return score_batches(model, (windows.get_batch(b) for b in batches), device, PRECISIONS[precision],
                             tokenizer)


def _auto_precision(model, batch, device):
    """'fp32' or 'bf16' for scoring model: mygpt.inference_precision's rule, timing its forward on batch (in
    inference mode, which inference_precision gives the timed steps)."""
    device = torch.device(device)
    x, y = (t.to(device) for t in batch)

    def forward(dtype):
        with _precision.autocast(device.type, dtype):
            float(model(x, y)[1])  # reading the loss waits for the device
    with _eval_mode(model):
        return inference_precision(model, "auto", forward)
