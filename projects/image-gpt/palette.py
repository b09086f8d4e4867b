"""
A colour palette by k-means, in torch: k-means++ seeding, then Lloyd's iterations.

iGPT models images as sequences of palette indices: 512 colours for CIFAR-10 keep a 32x32 image at
1024 tokens of a 512-word vocabulary instead of 3072 tokens of 256 intensities.
"""

import torch


def nearest(x, centres, chunk=1 << 16):
    """Index of the nearest centre for every row of x, in chunks so the distance matrix stays small."""
    return torch.cat([torch.cdist(part, centres).argmin(dim=1) for part in x.split(chunk)])


def kmeans_plus_plus(x, k, generator):
    """k starting centres: each next one drawn with probability proportional to its squared distance
    to the nearest centre so far, which spreads them over the data (Arthur and Vassilvitskii, 2007)."""
    centres = x.new_empty(k, x.shape[1])
    centres[0] = x[torch.randint(len(x), (1,), generator=generator)]
    d2 = (x - centres[0]).pow(2).sum(dim=1)
    for i in range(1, k):
        # with fewer distinct points than k every distance can be 0: then any point will do
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        centres[i] = x[torch.multinomial(weights, 1, generator=generator)]
        d2 = torch.minimum(d2, (x - centres[i]).pow(2).sum(dim=1))
    return centres


def kmeans(x, k, iters=30, seed=0):
    """k centres (k, D) for the points x (N, D), after at most `iters` rounds of Lloyd's algorithm."""
    x = x.float()
    centres = kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
    assign = None
    for _ in range(iters):
        new_assign = nearest(x, centres)
        if assign is not None and torch.equal(new_assign, assign):
            break  # converged: the centres would not move
        assign = new_assign
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        # a centre that lost all its points stays where it is rather than becoming 0/0
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres


def quantise(images, palette):
    """Images (N, H, W, C) in [0, 1] -> token sequences (N, H * W) of palette indices, in raster order."""
    n, h, w, c = images.shape
    return nearest(images.reshape(-1, c).float(), palette).view(n, h * w)


def dequantise(tokens, palette, height, width):
    """Token sequences (N, H * W) -> images (N, H, W, C) in the palette's colours."""
    return palette[tokens].view(len(tokens), height, width, palette.shape[1])
