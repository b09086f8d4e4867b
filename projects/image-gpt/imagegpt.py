"""
An image GPT (iGPT): images as raster-order sequences of palette indices, modelled like text.

The palette comes from k-means over the training pixels (palette.py). A sample starts from a first
pixel drawn from how often each colour starts a training image, and continues with top-k sampling.
The run reports the val loss per token and writes samples.png (samples on the left, real val images
on the right); sample mode draws new samples from a run's checkpoint.

    python projects/image-gpt/imagegpt.py                       # scikit-learn's 8x8 digits, offline
    python projects/image-gpt/imagegpt.py --system.mode=sample --sample.n=64 --sample.file=more.png
    python projects/image-gpt/imagegpt.py --data.dataset=folder --data.folder=photos --data.image_size=16
    python projects/image-gpt/imagegpt.py --data.dataset=cifar10   # 512 colours, 1024 tokens an image: a GPU job
"""

import math
import os
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

import images
from palette import dequantise, kmeans, quantise
from mygpt import (GPT, CfgNode, Trainer, atomic_path, check_new_run, exclusive, load_checkpoint, open_checkpoint,
                   run_main, setup_logging, setup_script, write_history)

N_CLUSTERS = {"digits": 16, "cifar10": 512, "folder": 64}  # 512 for CIFAR-10 as in the iGPT paper
EXPECTED_DURATION = "about 1.5 minutes of one CPU thread (OMP_NUM_THREADS=1) for the digits"


def get_config():
    C = CfgNode()
    C.system = CfgNode(seed=3407, work_dir="./out/image-gpt", mode="train")  # mode: 'train' or 'sample'
    C.data = CfgNode(dataset="digits", folder=None, image_size=16, n_clusters=None,
                     kmeans_pixels=200_000, kmeans_iters=30)
    C.model = GPT.get_default_config()
    C.model.n_layer, C.model.n_head, C.model.n_embd = 2, 4, 128
    C.trainer = Trainer.get_default_config()
    C.trainer.max_iters = 1000
    C.trainer.batch_size = 32
    C.trainer.learning_rate = 1e-3
    C.trainer.eval_interval = 500
    C.trainer.eval_iters = None     # None: the whole val split
    C.trainer.ckpt_path = None      # None: checkpoint.pt in the work dir
    C.trainer.ckpt_interval = 250   # a killed run keeps its work: --trainer.resume=True continues it
    C.sample = CfgNode(n=32, top_k=None, columns=8, scale=4, file="samples.png")  # file: in the work dir
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
    """The palette record: the k-means centres of (a random subset of) the training pixels, and how often
    each colour starts a training image (the first pixel, which the GPT never predicts). A plain dict, kept
    by the Trainer in every checkpoint as the run's tokenizer, so that a checkpoint alone can draw images."""
    _, height, width, channels = train_images.shape
    pixels = train_images.reshape(-1, channels)
    if len(pixels) > data.kmeans_pixels:
        pixels = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[:data.kmeans_pixels]]
    palette = kmeans(pixels, data.n_clusters or N_CLUSTERS[data.dataset], iters=data.kmeans_iters, seed=seed)
    first = quantise(train_images[:, :1, :1], palette)[:, 0]
    return {"type": "palette", "colours": palette.tolist(), "height": height, "width": width,
            "first_token_counts": torch.bincount(first, minlength=len(palette)).tolist()}


@torch.no_grad()
def sample_tokens(model, first_token_counts, n, length, top_k=None):
    """n sequences of `length` tokens: the first drawn in proportion to first_token_counts, the rest from the model."""
    device = next(model.parameters()).device
    first = torch.multinomial(first_token_counts, n, replacement=True)[:, None].to(device)
    return model.generate(first, length - 1, do_sample=True, top_k=top_k).cpu()


def save_grid(path, samples, reals, columns, scale):
    """A PNG: the samples in a grid on the left and, when given, the real images in a grid on the right."""
    Image = images.optional_import("PIL.Image", "pillow")

    def grid(batch):
        n, h, w, c = batch.shape
        rows = -(-n // columns)
        canvas = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=np.float32)  # white lines
        for i, im in enumerate(batch.numpy()):
            r, col = divmod(i, columns)
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = im
        return canvas

    grids = [grid(samples)] + ([] if reals is None else [grid(reals)])
    height = max(len(g) for g in grids)
    pad = lambda g: np.pad(g, ((0, height - len(g)), (0, 0), (0, 0)), constant_values=1.0)
    gap = np.ones((height, 2, grids[0].shape[2]), dtype=np.float32)
    canvas = np.concatenate([pad(grids[0])] + [part for g in grids[1:] for part in (gap, pad(g))], axis=1)
    pixels = (canvas.clip(0, 1) * 255).round().astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_path(path) as tmp:  # a stopped write never leaves half an image where the last one was
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(tmp, format="PNG")


def run_palette(ckpt, ckpt_path):
    """The palette record of a run's checkpoint (read from ckpt_path), which the Trainer keeps as its tokenizer."""
    pixels = ckpt.get("tokenizer")
    if not pixels or pixels.get("type") != "palette":
        raise ValueError(f"{ckpt_path} records no palette: it was not written by image-gpt (or by an image-gpt "
                         f"older than its sample mode); train a new run")
    return pixels


def write_samples(path, model, pixels, S, reals=None):
    """Draw S.n images from the model and save them (beside reals, when given) as a PNG grid."""
    palette = torch.tensor(pixels["colours"])
    h, w = pixels["height"], pixels["width"]
    tokens = sample_tokens(model, torch.tensor(pixels["first_token_counts"], dtype=torch.float), S.n, h * w, S.top_k)
    save_grid(path, dequantise(tokens, palette, h, w), reals, S.columns, S.scale)


def check_sample_config(S):
    """Refuse bad sampling options before training, not after it."""
    for key in ("n", "columns", "scale"):
        value = getattr(S, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--sample.{key} must be a positive int, got {value!r}")
    if S.top_k is not None and (isinstance(S.top_k, bool) or not isinstance(S.top_k, int) or S.top_k < 1):
        raise ValueError(f"--sample.top_k must be None or an int >= 1, got {S.top_k!r}")
    if not isinstance(S.file, str) or not S.file.lower().endswith(".png"):
        raise ValueError(f"--sample.file must be a file name ending in .png, got {S.file!r}")


def train(config):
    work_dir, seed = config.system.work_dir, config.system.seed
    C = config.trainer
    C.ckpt_path = C.ckpt_path or os.path.join(work_dir, "checkpoint.pt")
    check_sample_config(config.sample)
    with exclusive(config.system.work_dir):  # one run at a time in a work dir, before anything is written
        check_new_run(config.trainer)  # before anything is written to the work dir
        resuming = C.resume and os.path.exists(C.ckpt_path)

        train_images, val_images = load_images(config.data, seed)
        _, height, width, _ = train_images.shape
        # resuming, the palette the checkpoint was trained with rather than a new fit
        if resuming:
            pixels = run_palette(load_checkpoint(C.ckpt_path), C.ckpt_path)
        else:
            pixels = fit_palette(train_images, config.data, seed)
        palette = torch.tensor(pixels["colours"])
        train_tokens, val_tokens = quantise(train_images, palette), quantise(val_images, palette)

        config.model.vocab_size = len(palette)
        config.model.block_size = height * width - 1
        C.eval_iters = C.eval_iters or math.ceil(len(val_tokens) / C.batch_size)
        log = setup_logging(config)
        log.info(f"expected duration of the default run: {EXPECTED_DURATION}; torch threads here: {torch.get_num_threads()}")
        error = (dequantise(val_tokens, palette, height, width) - val_images).abs().mean()
        log.info(f"{len(train_images)} train and {len(val_images)} val images of {height}x{width}, "
                 f"{len(palette)} colours (mean absolute quantisation error {error:.4f})")

        model = GPT(config.model)
        log.info(f"{model.num_parameters() / 1e6:.2f}M parameters, sequences of {height * width} tokens")
        trainer = Trainer(C, model, ImageTokens(train_tokens), ImageTokens(val_tokens), tokenizer=pixels)
        trainer.run()
        write_history(trainer, work_dir)  # history.csv, and loss.png with matplotlib
        if trainer.interrupted:  # Ctrl-C or SIGTERM: the checkpoint is saved; leave the grace time unused
            log.info("continue this run with --trainer.resume=True")
            return
        last_val = trainer.history[-1].get("val_loss") if trainer.history else None  # evaluated at the last step
        log.info(f"val loss per token: {trainer.evaluate() if last_val is None else last_val:.4f}")

        path = os.path.join(work_dir, config.sample.file)
        write_samples(path, model, pixels, config.sample, reals=val_images[:config.sample.n])
        log.info(f"samples (left) next to real val images (right): {path}")


def sample_from_checkpoint(config):
    """Write config.sample.n new images from the run's checkpoint to config.sample.file in its work dir."""
    check_sample_config(config.sample)
    work_dir = config.system.work_dir
    path = os.path.join(work_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{work_dir} holds no checkpoint.pt: train first, or point --system.work_dir "
                                f"at a run's work dir")
    model, _, ckpt = open_checkpoint(path)
    out = os.path.join(work_dir, config.sample.file)
    write_samples(out, model, run_palette(ckpt, path), config.sample)
    print(f"{config.sample.n} samples from {path}: {out}")


def main(args):
    config = setup_script(get_config(), args, __doc__, modes=("train", "sample"))  # --model.preset=modern first
    if config.system.mode == "sample":
        return sample_from_checkpoint(config)
    train(config)


if __name__ == "__main__":
    sys.exit(run_main(main))  # the library's errors as one line, `NAME: error: ...`, as the mygpt command prints them
