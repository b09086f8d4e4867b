"""
An image GPT (iGPT): images as raster-order sequences of palette indices, modelled like text.

The palette comes from k-means over the training pixels (palette.py). A sample starts from a first
pixel drawn from how often each colour starts a training image, and continues with top-k sampling.
The run writes samples.png (samples on the left, real test images on the right) and reports the test
loss per token.

    python projects/image-gpt/imagegpt.py                       # scikit-learn's 8x8 digits, offline
    python projects/image-gpt/imagegpt.py --data.dataset=folder --data.folder=photos --data.image_size=16
    python projects/image-gpt/imagegpt.py --data.dataset=cifar10   # 512 colours, 1024 tokens an image: a GPU job
"""

import os
import math
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

import images
from palette import dequantise, kmeans, quantise
from mygpt import GPT, CfgNode, Trainer, set_seed, setup_logging

N_CLUSTERS = {"digits": 16, "cifar10": 512, "folder": 64}  # 512 for CIFAR-10 as in the iGPT paper


def get_config():
    C = CfgNode()
    C.system = CfgNode(seed=3407, work_dir="./out/image-gpt")
    C.data = CfgNode(dataset="digits", folder=None, image_size=16, n_clusters=None,
                     kmeans_pixels=200_000, kmeans_iters=30)
    C.model = GPT.get_default_config()
    C.model.n_layer, C.model.n_head, C.model.n_embd = 4, 4, 128
    C.trainer = Trainer.get_default_config()
    C.trainer.max_iters = 1500
    C.trainer.batch_size = 32
    C.trainer.learning_rate = 1e-3
    C.trainer.eval_interval = 500
    C.trainer.eval_iters = None  # None: the whole test split
    C.trainer.ckpt_path = None   # None: checkpoint.pt in the work dir
    C.sample = CfgNode(n=32, top_k=None, columns=8, scale=4)
    return C


class ImageTokens(Dataset):
    """Palette-index sequences (N, L) as (x, y) pairs of the first L - 1 and the last L - 1 tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i, :-1], self.tokens[i, 1:]


def load_images(data, seed):
    if data.dataset == "digits":
        return images.load_digits(seed=seed)
    if data.dataset == "cifar10":
        return images.load_cifar10()
    if data.dataset == "folder":
        if data.folder is None:
            raise ValueError("--data.dataset=folder needs --data.folder=path/to/images")
        return images.load_folder(data.folder, data.image_size, seed=seed)
    raise ValueError(f"unknown dataset {data.dataset!r}; choose digits, cifar10 or folder")


def fit_palette(train_images, data, seed):
    """k-means centres of (a random subset of) the training pixels."""
    pixels = train_images.reshape(-1, train_images.shape[-1])
    if len(pixels) > data.kmeans_pixels:
        pixels = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[:data.kmeans_pixels]]
    return kmeans(pixels, data.n_clusters or N_CLUSTERS[data.dataset], iters=data.kmeans_iters, seed=seed)


@torch.no_grad()
def sample_tokens(model, first_token_probs, n, length, top_k=None):
    """n sequences of `length` tokens: the first drawn from first_token_probs, the rest from the model."""
    device = next(model.parameters()).device
    first = torch.multinomial(first_token_probs, n, replacement=True)[:, None].to(device)
    return model.generate(first, length - 1, do_sample=True, top_k=top_k).cpu()


def save_grid(path, samples, reals, columns, scale):
    """A PNG: the samples in a grid on the left, the real images in a grid on the right, a gap between."""
    Image = images.optional_import("PIL.Image", "pillow")

    def grid(batch):
        n, h, w, c = batch.shape
        rows = -(-n // columns)
        canvas = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=np.float32)  # white lines
        for i, im in enumerate(batch.numpy()):
            r, col = divmod(i, columns)
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = im
        return canvas

    left, right = grid(samples), grid(reals)
    height = max(len(left), len(right))
    pad = lambda g: np.pad(g, ((0, height - len(g)), (0, 0), (0, 0)), constant_values=1.0)
    gap = np.ones((height, 2, left.shape[2]), dtype=np.float32)
    canvas = np.concatenate([pad(left), gap, pad(right)], axis=1)
    pixels = (canvas.clip(0, 1) * 255).round().astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)


def main(args):
    config = get_config()
    config.merge_from_args(args)
    set_seed(config.system.seed)
    work_dir = config.system.work_dir

    train_images, test_images = load_images(config.data, config.system.seed)
    _, height, width, _ = train_images.shape
    palette = fit_palette(train_images, config.data, config.system.seed)
    train_tokens, test_tokens = quantise(train_images, palette), quantise(test_images, palette)
    first_token_probs = torch.bincount(train_tokens[:, 0], minlength=len(palette)).float()

    config.model.vocab_size = len(palette)
    config.model.block_size = height * width - 1
    config.trainer.ckpt_path = config.trainer.ckpt_path or os.path.join(work_dir, "checkpoint.pt")
    config.trainer.eval_iters = config.trainer.eval_iters or math.ceil(len(test_tokens) / config.trainer.batch_size)
    log = setup_logging(config)
    error = (dequantise(test_tokens, palette, height, width) - test_images).abs().mean()
    log.info(f"{len(train_images)} train and {len(test_images)} test images of {height}x{width}, "
             f"{len(palette)} colours (mean absolute quantisation error {error:.4f})")
    torch.save({"palette": palette, "first_token_probs": first_token_probs}, os.path.join(work_dir, "palette.pt"))

    model = GPT(config.model)
    log.info(f"{model.num_parameters() / 1e6:.2f}M parameters, sequences of {height * width} tokens")
    trainer = Trainer(config.trainer, model, ImageTokens(train_tokens), ImageTokens(test_tokens))
    trainer.run()
    trainer.save_history(os.path.join(work_dir, "history.csv"))
    log.info(f"test loss per token: {trainer.evaluate():.4f}")

    S = config.sample
    tokens = sample_tokens(model, first_token_probs, S.n, height * width, S.top_k)
    samples = dequantise(tokens, palette, height, width)
    reals = test_images[:S.n]
    path = os.path.join(work_dir, "samples.png")
    save_grid(path, samples, reals, S.columns, S.scale)
    log.info(f"samples (left) next to real test images (right): {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
