"""
The image sets of the image-gpt project, each as float tensors (N, H, W, C) in [0, 1] for train and test.

- digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, offline).
- cifar10: the official CIFAR-10 python tarball, fetched through mygpt.download and read with pickle.
- folder: every image file in a directory, centre-cropped to a square and resized.

scikit-learn and Pillow are optional (pip install -e ".[projects]"): each is imported only when used.
"""

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from mygpt import download

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def optional_import(module, package):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"this needs {package}: pip install {package} (or pip install -e '.[projects]')") from None


def split(images, test_fraction, seed):
    """A fixed random train/test split of the first axis."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    num_test = max(1, int(len(images) * test_fraction))
    return images[order[num_test:]], images[order[:num_test]]


def load_digits(test_fraction=0.2, seed=0):
    datasets = optional_import("sklearn.datasets", "scikit-learn")
    pixels = datasets.load_digits().images  # (1797, 8, 8), intensities 0..16
    images = torch.tensor(pixels / 16.0, dtype=torch.float32).unsqueeze(-1)
    return split(images, test_fraction, seed)


def read_cifar10(tarball):
    """Train (50000) and test (10000) images from the CIFAR-10 python tarball, read without unpacking it."""
    parts = {"train": [], "test": []}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = Path(member.name).name
            if name.startswith("data_batch_") or name == "test_batch":
                # the official batches are pickled dicts; the tarball's sha256 was checked before we get here
                batch = pickle.load(tar.extractfile(member), encoding="bytes")
                # each row holds the 1024 red, then green, then blue values of a 32x32 image
                rgb = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                parts["test" if name == "test_batch" else "train"].append((name, rgb))
    if not parts["train"] or not parts["test"]:
        raise ValueError(f"{tarball} holds no CIFAR-10 data_batch_* and test_batch files")
    train, test = (torch.from_numpy(np.concatenate([rgb for _, rgb in sorted(parts[s])])) for s in ("train", "test"))
    return train.float() / 255, test.float() / 255


def load_cifar10():
    return read_cifar10(download(CIFAR10_URL, CIFAR10_SHA256))


def load_folder(folder, size, test_fraction=0.1, seed=0):
    """Every image under `folder` as RGB, centre-cropped to a square and resized to size x size."""
    Image = optional_import("PIL.Image", "pillow")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ValueError(f"{folder} needs at least 2 images (a train and a test one), found {len(paths)}")
    images = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
            images.append(np.asarray(im))
    return split(torch.from_numpy(np.stack(images)).float() / 255, test_fraction, seed)
