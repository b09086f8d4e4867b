"""
Scoring a model on token windows: the summed loss in nats, the number of targets and the UTF-8 bytes they
decode to. Loss per token = nats / targets, perplexity = exp(that), and bits per byte = nats / ln 2 / bytes,
which compares models with different tokenizers (a special token counts as the bytes of its text).
"""

from contextlib import nullcontext

import torch


@torch.inference_mode()
def score(model, windows, tokenizer, indices, batch_size, device="cpu", autocast=None):
    """(nats, targets, bytes) of model over the windows at `indices`, batch_size at a time.

    windows has get_batch(indices) -> (x, y), as mygpt.data.TokenDataset; tokenizer has decode_bytes, as
    mygpt.tokenizer.load_tokenizer returns; autocast is a context manager for the forward passes (e.g.
    torch.autocast) or None.
    """
    indices = list(indices)
    was_training = model.training
    model.eval()
    nats, targets, nbytes = 0.0, 0, 0
    try:
        for start in range(0, len(indices), batch_size):
            x, y = windows.get_batch(indices[start:start + batch_size])  # (B, T) each
            with autocast or nullcontext():
                _, loss = model(x.to(device), y.to(device))
            count = int((y >= 0).sum())
            nats += loss.double().item() * count  # the model's mean over this batch's targets, back to a sum
            targets += count
            nbytes += len(tokenizer.decode_bytes(y[y >= 0].tolist()))
    finally:
        model.train(was_training)
    return nats, targets, nbytes
