"""Smoke tests of the projects: each script runs a few iterations of a tiny model on tiny data, and the
outputs a user would judge (accuracy line, samples, checkpoints, PNG) are checked for real."""

import importlib.util
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch

from mygpt.utils import CfgNode, setup_logging

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = ROOT / "projects"
TINY_MODEL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--trainer.quiet=True"]


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args):
    """Run a project script as a user would; return its stdout, failing the test with its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(PROJECTS / script), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


class TestSetupLogging(unittest.TestCase):
    def test_writes_config_and_log(self):
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, "run")
            config = CfgNode(system=CfgNode(work_dir=work_dir), model=CfgNode(n_layer=2))
            setup_logging(config).info("hello")
            with open(os.path.join(work_dir, "config.json")) as f:
                self.assertEqual(json.load(f), config.to_dict())
            with open(os.path.join(work_dir, "log.txt")) as f:
                self.assertIn("hello", f.read())


class TestAdder(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.adder = load_module(PROJECTS / "adder" / "adder.py", "adder_project")

    def dataset(self, split, ndigit=2):
        config = self.adder.AdditionDataset.get_default_config()
        config.ndigit = ndigit
        return self.adder.AdditionDataset(config, split, seed=3)

    def test_splits_are_disjoint_and_cover_every_problem(self):
        train, test = self.dataset("train"), self.dataset("test")
        train_ids, test_ids = set(train.problems.tolist()), set(test.problems.tolist())
        self.assertEqual(len(test_ids), 2000)
        self.assertFalse(train_ids & test_ids)
        self.assertEqual(train_ids | test_ids, set(range(10 ** 4)))

    def test_sum_is_written_backwards_and_only_it_is_predicted(self):
        self.assertEqual(self.adder.encode(torch.tensor([4785]), 2).tolist(), [[4, 7, 8, 5, 2, 3, 1]])  # 47+85=132
        train = self.dataset("train")
        x, y = train[0]
        seq = train.sequences[0]
        self.assertEqual(x.tolist(), seq[:-1].tolist())
        self.assertEqual(y.tolist(), [-1, -1, -1] + seq[4:].tolist())

    def test_script_ends_with_the_accuracy_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = run_script("adder/adder.py", f"--system.work_dir={tmp}", "--trainer.max_iters=20", *TINY_MODEL)
            last = out.strip().splitlines()[-1]
            match = re.fullmatch(r"test accuracy: (\d+)/(\d+) = (\d+\.\d\d)%", last)
            self.assertIsNotNone(match, last)
            correct, total, pct = int(match[1]), int(match[2]), float(match[3])
            self.assertEqual(total, 2000)
            self.assertAlmostEqual(pct, round(100 * correct / total, 2))
            self.assertTrue(os.path.exists(os.path.join(tmp, "checkpoint.pt")))
            with open(os.path.join(tmp, "config.json")) as f:
                self.assertEqual(json.load(f)["model"]["n_embd"], 32)


class TestCharGPT(unittest.TestCase):
    def test_train_resume_and_sample(self):
        text = "".join(f"{a} and {b} make {a + b}.\n" for a in range(40) for b in range(12))
        with tempfile.TemporaryDirectory() as tmp:
            text_file = os.path.join(tmp, "numbers.txt")
            with open(text_file, "w", encoding="utf-8") as f:
                f.write(text)
            work_dir = os.path.join(tmp, "run")
            common = [f"--data.input_file={text_file}", f"--system.work_dir={work_dir}", "--data.block_size=16",
                      "--trainer.eval_interval=10", "--trainer.eval_iters=2", "--sample.every_eval=20", *TINY_MODEL]
            out = run_script("chargpt/chargpt.py", "--trainer.max_iters=20", *common)
            self.assertIn("val loss", out)
            for name in ("best.pt", "checkpoint.pt", "config.json", "vocab.json", "log.txt"):
                self.assertTrue(os.path.exists(os.path.join(work_dir, name)), name)

            out = run_script("chargpt/chargpt.py", "--trainer.max_iters=30", "--trainer.resume=True", *common)
            self.assertIn("resumed from", out)
            self.assertIn("iter 30: train loss", out)

            prompt = "12 and"
            out = run_script("chargpt/chargpt.py", "--system.mode=sample", f"--system.work_dir={work_dir}",
                             f"--sample.prompt={prompt}", "--sample.length=50")
            self.assertTrue(out.startswith(prompt))
            self.assertEqual(len(out), len(prompt) + 50 + 1)  # print adds the final newline
            self.assertLessEqual(set(out[:-1]), set(text))


class TestImageGPT(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        folder = PROJECTS / "image-gpt"
        cls.palette = load_module(folder / "palette.py", "imagegpt_palette")
        cls.images = load_module(folder / "images.py", "imagegpt_images")

    def test_palette_round_trip_on_clustered_colours(self):
        g = torch.Generator().manual_seed(0)
        colours = torch.tensor([[r, gr, b] for r in (0.1, 0.9) for gr in (0.1, 0.9) for b in (0.1, 0.9)])
        # 16x16 images whose pixels are 8 well-separated colours plus noise of at most 0.01
        pixels = colours[torch.randint(8, (20, 16, 16), generator=g)]
        pixels = pixels + (torch.rand(pixels.shape, generator=g) - 0.5) * 0.02
        palette = self.palette.kmeans(pixels.reshape(-1, 3), 8, seed=0)
        tokens = self.palette.quantise(pixels, palette)
        self.assertEqual(tokens.shape, (20, 256))
        back = self.palette.dequantise(tokens, palette, 16, 16)
        self.assertLess((back - pixels).abs().max().item(), 0.02)

    def test_palette_round_trip_on_digits(self):
        train, test = self.images.load_digits()
        palette = self.palette.kmeans(train.reshape(-1, 1), 16, seed=0)
        back = self.palette.dequantise(self.palette.quantise(test, palette), palette, 8, 8)
        self.assertLess((back - test).abs().mean().item(), 0.01)

    def test_kmeans_plus_plus_with_fewer_distinct_points_than_clusters(self):
        x = torch.tensor([[0.0], [1.0]]).repeat(10, 1)
        palette = self.palette.kmeans(x, 4, seed=0)
        self.assertEqual(set(palette.flatten().tolist()), {0.0, 1.0})

    def test_cifar10_tarball_is_read_as_rgb(self):
        def batch(n, offset):
            data = (np.arange(n * 3072) + offset).reshape(n, 3072) % 251
            return pickle.dumps({b"data": data.astype(np.uint8), b"labels": [0] * n})

        with tempfile.TemporaryDirectory() as tmp:
            tarball = os.path.join(tmp, "cifar.tar.gz")
            with tarfile.open(tarball, "w:gz") as tar:
                for name, n, offset in [("data_batch_2", 2, 5), ("data_batch_1", 3, 0), ("test_batch", 1, 7)]:
                    payload = batch(n, offset)
                    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            train, test = self.images.read_cifar10(tarball)
        self.assertEqual(tuple(train.shape), (5, 32, 32, 3))
        self.assertEqual(tuple(test.shape), (1, 32, 32, 3))
        # pixel (row 0, column 1) of the first image: red is value 1, green 1025, blue 2049 of its row
        self.assertEqual((train[0, 0, 1] * 255).round().tolist(), [1, 1025 % 251, 2049 % 251])
        self.assertEqual((test[0, 0, 0, 0] * 255).round().item(), 7)

    def test_folder_images_are_cropped_and_resized(self):
        from PIL import Image
        with tempfile.TemporaryDirectory() as tmp:
            for i, size in enumerate([(30, 20), (12, 12), (8, 40)]):
                Image.new("RGB", size, (40 * i, 100, 200)).save(os.path.join(tmp, f"im{i}.png"))
            train, test = self.images.load_folder(tmp, 8, test_fraction=0.3)
        self.assertEqual((len(train), len(test)), (2, 1))
        self.assertEqual(tuple(train.shape[1:]), (8, 8, 3))

    def test_script_writes_a_png_of_samples(self):
        from PIL import Image
        with tempfile.TemporaryDirectory() as tmp:
            out = run_script("image-gpt/imagegpt.py", f"--system.work_dir={tmp}", "--trainer.max_iters=10",
                             "--sample.n=8", "--sample.columns=4", "--sample.scale=2", *TINY_MODEL)
            self.assertRegex(out, r"test loss per token: \d+\.\d+")
            path = os.path.join(tmp, "samples.png")
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            with Image.open(path) as im:
                im.load()
                # two 4x2 grids of 8x8 images with 1-pixel lines, a 2-pixel gap, all scaled by 2
                self.assertEqual(im.size, (2 * (2 * (4 * 9 + 1) + 2), 2 * (2 * 9 + 1)))


if __name__ == "__main__":
    unittest.main()
