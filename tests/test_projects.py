"""Smoke tests of the projects: each script runs a few iterations of a tiny model on tiny data, and the
outputs a user would judge (accuracy line, samples, checkpoints, PNG) are checked for real."""

import importlib.util
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest
from pathlib import Path

import numpy as np
import torch

from mygpt import load_checkpoint
from mygpt.utils import CfgNode, setup_logging
from tests.helpers import detach_log_handlers, process_level

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = ROOT / "projects"
TINY_MODEL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--trainer.quiet=True"]


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, fails=False):
    """Run a project script as a user would; return its stdout, failing the test with its stderr.
    With fails=True the script must fail, and its stderr is returned."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(PROJECTS / script), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    if (result.returncode != 0) != fails:
        raise AssertionError(f"{script} {' '.join(args)} {'succeeded' if fails else 'failed'}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result.stderr if fails else result.stdout


def write_text(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def file_state(path):
    """What a rerun must leave alone: the bytes and modification time of a file."""
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_mtime_ns


RERUN_WAYS = ("--trainer.resume=True", "--trainer.overwrite=True", "--system.work_dir")


@process_level
class TestErrorsAreOneLine(unittest.TestCase):
    """Every project script ends a user's mistake as the mygpt command does: one line `NAME: error: ...` naming
    the file or option at fault, status 2 for a wrong command line and 1 otherwise, no traceback."""

    def test_each_script(self):
        with tempfile.TemporaryDirectory() as tmp:
            earlier = os.path.join(tmp, "earlier")
            os.makedirs(earlier)
            write_text(earlier, "checkpoint.pt", "an earlier run's checkpoint")
            short = write_text(tmp, "short.txt", "hello world\n")
            binary = os.path.join(tmp, "binary.cfg")
            with open(binary, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n\x00\xff")
            cases = [
                ("adder/adder.py", [f"--system.work_dir={earlier}"], 1, "checkpoint.pt already holds a checkpoint of an "
                                                                      "earlier run.*--trainer.resume=True"),
                ("adder/adder.py", ["--data.ndigit=4"], 1, "--data.ndigit must be an int from 1 to 3"),
                ("chargpt/chargpt.py", [f"--data.input_file={tmp}/missing.txt"], 1,
                 "--data.input_file .*missing.txt does not exist"),
                ("chargpt/chargpt.py", [f"--data.input_file={short}", f"--system.work_dir={tmp}/c"], 1,
                 "short.txt holds 12 characters; with block_size=64"),
                ("chargpt/chargpt.py", ["--trainer.device=gpu"], 1, "--trainer.device='gpu' is not a device"),
                ("chargpt/chargpt.py", ["--system.seed=99999999999"], 1, r"--system.seed must be an int from 0 to 2\*\*32"),
                ("chargpt/chargpt.py", ["--trainer.batchsize=3"], 2, "unknown config key 'trainer.batchsize'; did you "
                                                                     "mean 'trainer.batch_size'"),
                ("chargpt/chargpt.py", ["--trainer.batch_size=x"], 2, "trainer.batch_size wants an int, got 'x'"),
                ("gpt2/train.py", [binary], 1, "configuration .*binary.cfg is not UTF-8 text"),
                ("gpt2/train.py", ["no_such_config"], 1, "no configuration 'no_such_config'"),
                ("gpt2/prepare.py", [binary, f"--out={tmp}/p"], 1, "binary.cfg is not UTF-8 text"),
                ("gpt2/sample.py", [f"--work_dir={tmp}/nothing"], 1, "nothing holds no best.pt or checkpoint.pt"),
                ("gpt2/sample.py", ["--seed=-1"], 1, r"--seed must be an int from 0 to 2\*\*64 - 1"),
                ("image-gpt/imagegpt.py", ["--system.mode=x"], 1, "--system.mode must be 'train' or 'sample'"),
            ]
            if not torch.cuda.is_available():
                cases.append(("chargpt/chargpt.py", ["--trainer.device=cuda"], 1, "--trainer.device=cuda: this "))
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            for script, args, status, message in cases:
                with self.subTest(script=script, args=args):
                    result = subprocess.run([sys.executable, str(PROJECTS / script), *args], capture_output=True,
                                            text=True, env=env, timeout=300, cwd=tmp)
                    self.assertEqual(result.returncode, status, result.stderr)
                    # one line, the last (a progress bar may stand above it), and no traceback
                    lines = [line for line in result.stderr.splitlines() if not line.startswith("prepare: ")]
                    self.assertRegex(lines[-1], f"^{os.path.basename(script)}: error: .*{message}")
                    self.assertEqual([line for line in lines if line.strip()], lines[-1:], result.stderr)
            self.assertEqual(os.listdir(earlier), ["checkpoint.pt"])


class TestPackaging(unittest.TestCase):
    def test_the_test_extra_leaves_triton_to_the_gpu_extra_and_ci_installs_both(self):
        import ast
        setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
        extras = next(ast.literal_eval(k.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                      for k in node.keywords if k.arg == "extras_require")
        self.assertFalse([r for r in extras["test"] if r.startswith("triton")])  # 1 GB a CPU user does not need
        self.assertTrue([r for r in extras["gpu"] if r.startswith("triton")])
        self.assertIn('-e ".[test,gpu]"', (ROOT / ".ci" / "run").read_text(encoding="utf-8"))


class TestPublicAPI(unittest.TestCase):
    """The projects live on `from mygpt import ...`; a benchmark reaches inside only for what it times piece by piece."""
    DEEP = r"^\s*(?:from|import) (mygpt\.\S+)"
    BENCH_INSIDE = {  # script: the modules it measures from inside (each import says why)
        "bench_bpe.py": ["mygpt.bpe"], "bench_evals.py": ["mygpt.evals", "mygpt.tasks"],
        "bench_fsdp.py": ["mygpt.parallel"], "gpu.py": ["mygpt.kernels", "mygpt.model"],
        "compare_checkouts.py": ["mygpt.model"],
    }

    def test_projects_import_only_from_mygpt_and_leave_sys_path_alone(self):
        scripts = sorted(PROJECTS.glob("*/*.py"))
        self.assertGreaterEqual(len(scripts), 9)  # adder, chargpt, gpt2, image-gpt and their helpers
        for script in scripts:
            source = script.read_text(encoding="utf-8")
            self.assertEqual(re.findall(self.DEEP, source, flags=re.M), [], script)
            self.assertNotIn("sys.path", source, script)

    def test_benchmarks_reach_inside_only_where_they_time_a_part(self):
        for script in sorted((ROOT / "bench").glob("*.py")):
            found = re.findall(self.DEEP, script.read_text(encoding="utf-8"), flags=re.M)
            self.assertEqual(sorted(set(found)), self.BENCH_INSIDE.get(script.name, []), script.name)


class TestSetupLogging(unittest.TestCase):
    def test_writes_config_and_log(self):
        self.addCleanup(detach_log_handlers)
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, "run")
            config = CfgNode(system=CfgNode(work_dir=work_dir), model=CfgNode(n_layer=2))
            setup_logging(config).info("hello")
            with open(os.path.join(work_dir, "config.json")) as f:
                self.assertEqual(json.load(f), config.to_dict())
            with open(os.path.join(work_dir, "log.txt")) as f:
                self.assertIn("hello", f.read())


@process_level
class TestHelp(unittest.TestCase):
    def test_help_lists_every_key_with_its_default_and_type(self):
        def leaves(node, prefix=""):
            for key, value in vars(node).items():
                if isinstance(value, CfgNode):
                    yield from leaves(value, f"{prefix}{key}.")
                else:
                    yield f"{prefix}{key}", value

        for script in ("adder/adder.py", "chargpt/chargpt.py", "image-gpt/imagegpt.py"):
            with self.subTest(script):
                folder = str(PROJECTS / Path(script).parent)
                sys.path.insert(0, folder)  # image-gpt imports its neighbours by name
                try:
                    config = load_module(PROJECTS / script, f"help_{Path(script).stem}").get_config()
                finally:
                    sys.path.remove(folder)
                lines = run_script(script, "--help").splitlines()
                for key, default in leaves(config):
                    entry = f"  --{key}={default!r} "  # then the type its value is read as
                    kind = "literal or text" if default is None else type(default).__name__
                    found = [line[len(entry):].strip() for line in lines if line.startswith(entry)]
                    self.assertEqual(len(found), 1, entry)
                    self.assertTrue(found[0].startswith(kind), (entry, found[0]))


@process_level
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
            args = [f"--system.work_dir={tmp}", "--trainer.max_iters=20", "--trainer.log_interval=10", *TINY_MODEL]
            out = run_script("adder/adder.py", *args)
            self.assertIn("expected duration of the default run", out)
            last = out.strip().splitlines()[-1]
            match = re.fullmatch(r"test accuracy: (\d+)/(\d+) = (\d+\.\d\d)%", last)
            self.assertIsNotNone(match, last)
            correct, total, pct = int(match[1]), int(match[2]), float(match[3])
            self.assertEqual(total, 2000)
            self.assertAlmostEqual(pct, round(100 * correct / total, 2))
            ckpt_path = os.path.join(tmp, "checkpoint.pt")
            self.assertEqual(load_checkpoint(ckpt_path)["tokenizer"], {"type": "chars", "chars": list("0123456789")})
            with open(os.path.join(tmp, "config.json")) as f:
                self.assertEqual(json.load(f)["model"]["n_embd"], 32)
            with open(os.path.join(tmp, "log.txt")) as f:
                self.assertEqual(len(re.findall(r"epoch \d+ iter \d+: train loss", f.read())), 2)  # steps 10, 20
            if importlib.util.find_spec("matplotlib"):  # the run's loss curve, beside history.csv
                with open(os.path.join(tmp, "loss.png"), "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

            # a second run in the same work dir stops before it writes anything
            before = file_state(ckpt_path), file_state(os.path.join(tmp, "config.json"))
            with self.assertRaises(FileExistsError) as cm:
                self.adder.main(args)
            for way in RERUN_WAYS:
                self.assertIn(way, str(cm.exception))
            self.assertEqual((file_state(ckpt_path), file_state(os.path.join(tmp, "config.json"))), before)

    def test_a_second_run_in_a_work_dir_that_is_running_is_refused(self):
        from mygpt import InUseError
        hold = "import sys, time; from mygpt import exclusive\nwith exclusive(sys.argv[1]):\n print(1, flush=True); time.sleep(60)"
        with tempfile.TemporaryDirectory() as tmp:
            running = subprocess.Popen([sys.executable, "-c", hold, tmp], stdout=subprocess.PIPE, text=True)
            try:
                running.stdout.readline()
                with self.assertRaisesRegex(InUseError, f"in use by process {running.pid} "):
                    self.adder.main([f"--system.work_dir={tmp}", "--trainer.max_iters=1"])
                self.assertEqual(os.listdir(tmp), [])  # refused before anything was written
            finally:
                running.kill()
                running.wait()
                running.stdout.close()

    def test_values_it_cannot_represent_are_refused(self):
        cases = [("--data.ndigit=0", "ndigit"), ("--data.ndigit=4", "ndigit"), ("--data.ndigit=-2", "ndigit"),
                 ("--data.ndigit=None", "ndigit"), ("--data.test_fraction=0", "test_fraction"),
                 ("--data.test_fraction=1", "test_fraction"), ("--data.test_fraction=1.5", "test_fraction"),
                 ("--data.ndigit=1 --data.test_fraction=0.001", "test_fraction"), ("--data.max_test=0", "max_test")]
        with tempfile.TemporaryDirectory() as tmp:
            for args, key in cases:
                with self.subTest(args):
                    with self.assertRaisesRegex(ValueError, key):
                        self.adder.main([f"--system.work_dir={tmp}", *args.split()])
                    self.assertEqual(os.listdir(tmp), [])  # refused before anything was written
        with self.assertRaisesRegex(ValueError, "split"):
            self.adder.AdditionDataset(self.adder.AdditionDataset.get_default_config(), "val")

    def test_largest_ndigit_splits_every_problem(self):
        config = self.adder.AdditionDataset.get_default_config()
        config.ndigit = self.adder.MAX_NDIGIT
        train, test = (self.adder.AdditionDataset(config, split, seed=3) for split in ("train", "test"))
        self.assertEqual((len(train), len(test)), (10 ** 6 - 10000, 10000))
        self.assertEqual(torch.cat([train.problems, test.problems]).unique().numel(), 10 ** 6)


@process_level
class TestCharGPT(unittest.TestCase):
    TEXT = "".join(f"{a} and {b} make {a + b}.\n" for a in range(40) for b in range(12))

    @classmethod
    def setUpClass(cls):
        cls.chargpt = load_module(PROJECTS / "chargpt" / "chargpt.py", "chargpt_project")

    def common(self, text_file, work_dir):
        return [f"--data.input_file={text_file}", f"--system.work_dir={work_dir}", "--data.block_size=16",
                "--trainer.eval_interval=10", "--trainer.eval_iters=2", "--sample.every_eval=20", *TINY_MODEL]

    def test_train_refuse_rerun_resume_and_sample(self):
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, "run")
            common = self.common(write_text(tmp, "numbers.txt", self.TEXT), work_dir)
            out = run_script("chargpt/chargpt.py", "--trainer.max_iters=20", "--trainer.log_interval=5", *common)
            self.assertIn("expected duration of the default run", out)
            self.assertIn("val loss", out)
            for name in ("best.pt", "checkpoint.pt", "config.json", "vocab.json", "log.txt"):
                self.assertTrue(os.path.exists(os.path.join(work_dir, name)), name)
            chars = sorted(set(self.TEXT))
            ckpt_path = os.path.join(work_dir, "checkpoint.pt")
            self.assertEqual(load_checkpoint(ckpt_path)["tokenizer"], {"type": "chars", "chars": chars})
            with open(os.path.join(work_dir, "log.txt")) as f:
                log = f.read()
            self.assertEqual(len(re.findall(r"epoch 1 iter \d+: train loss \d", log)), 4)  # every 5 of 20 steps
            self.assertEqual(re.findall(r"iter (\d+): val loss \d", log), ["10", "20"])

            # a rerun neither trains nor touches the run it would replace, and says how to go on
            kept = {name: file_state(os.path.join(work_dir, name)) for name in ("checkpoint.pt", "best.pt", "config.json")}
            with self.assertRaises(FileExistsError) as cm:
                self.chargpt.main(["--trainer.max_iters=10", *common])
            for way in RERUN_WAYS:
                self.assertIn(way, str(cm.exception))
            self.assertEqual({name: file_state(os.path.join(work_dir, name)) for name in kept}, kept)

            out = run_script("chargpt/chargpt.py", "--trainer.max_iters=30", "--trainer.resume=True", *common)
            self.assertIn("resumed from", out)
            self.assertIn("iter 30: train loss", out)
            self.assertEqual(load_checkpoint(ckpt_path)["iter_num"], 30)

            prompt = "12 and"
            out = run_script("chargpt/chargpt.py", "--system.mode=sample", f"--system.work_dir={work_dir}",
                             f"--sample.prompt={prompt}", "--sample.length=50")
            self.assertTrue(out.startswith(prompt))
            self.assertEqual(len(out), len(prompt) + 50 + 1)  # print adds the final newline
            self.assertLessEqual(set(out[:-1]), set(self.TEXT))

    def test_text_without_newline(self):
        text = self.TEXT.replace("\n", " ")
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, "run")
            out = run_script("chargpt/chargpt.py", "--trainer.max_iters=20",
                             *self.common(write_text(tmp, "line.txt", text), work_dir))
            self.assertIn("samples start from ' ' instead", out)  # the default prompt, a newline, is no character of it
            self.assertEqual(len(re.findall(r"val loss \d", out)), 3)  # at steps 10 and 20, and the final line
            out = run_script("chargpt/chargpt.py", "--system.mode=sample", f"--system.work_dir={work_dir}",
                             "--sample.length=30")
            self.assertEqual(len(out), 1 + 30 + 1)
            self.assertLessEqual(set(out[:-1]), set(text))

    def test_val_fraction_zero_trains_without_validation(self):
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, "run")
            out = run_script("chargpt/chargpt.py", "--trainer.max_iters=20", "--data.val_fraction=0",
                             *self.common(write_text(tmp, "numbers.txt", self.TEXT), work_dir))
            self.assertNotIn("val loss", out)
            self.assertTrue(os.path.exists(os.path.join(work_dir, "checkpoint.pt")))
            self.assertFalse(os.path.exists(os.path.join(work_dir, "best.pt")))
            self.assertEqual(load_checkpoint(os.path.join(work_dir, "checkpoint.pt"))["iter_num"], 20)

    def test_texts_it_cannot_train_on_are_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            files = {"empty": write_text(tmp, "empty.txt", ""),
                     "binary": os.path.join(tmp, "data.bin"), "latin": os.path.join(tmp, "latin1.txt")}
            with open(files["binary"], "wb") as f:
                f.write(b"text\0with a NUL byte" * 20)
            with open(files["latin"], "wb") as f:
                f.write("café au lait ".encode("latin-1") * 20)
            for kind, message in [("empty", "is empty"), ("binary", "binary"), ("latin", "not UTF-8")]:
                with self.subTest(kind):
                    with self.assertRaisesRegex(ValueError, message):
                        self.chargpt.main([f"--data.input_file={files[kind]}", f"--system.work_dir={tmp}/run"])
            for value in ("1", "1.5", "-0.1"):
                with self.subTest(val_fraction=value):
                    with self.assertRaisesRegex(ValueError, "val_fraction must be a number in \\[0, 1\\)"):
                        self.chargpt.main([f"--data.val_fraction={value}", f"--system.work_dir={tmp}/run"])
            self.assertFalse(os.path.exists(f"{tmp}/run"))  # refused before anything was written

    def test_short_text_is_refused_with_the_length_it_needs(self):
        data = CfgNode(block_size=16, val_fraction=0.1)
        for vf in (0.1, 0.25, 0.5, 0.0):
            data.val_fraction = vf
            # the plain rule: the shortest text whose split leaves block_size + 1 characters in each part used
            needed = next(n for n in range(1, 1000) if int(n * (1 - vf)) >= 17 and (vf == 0 or n - int(n * (1 - vf)) >= 17))
            with self.subTest(val_fraction=vf):
                train, val = self.chargpt.split_text("x" * needed, data, "t.txt")
                self.assertEqual((len(train) > 16, val is None or len(val) > 16), (True, True))
                with self.assertRaisesRegex(ValueError, f"holds {needed - 1} characters; with block_size=16 and "
                                                        f"val_fraction={vf} it needs at least {needed}"):
                    self.chargpt.split_text("x" * (needed - 1), data, "t.txt")
        tokenizer = self.chargpt.load_tokenizer({"type": "chars", "chars": ["a", "b"]})
        self.assertEqual(len(self.chargpt.CharDataset("ab", tokenizer, 16)), 0)  # never a negative length

    def test_sampling_prompt(self):
        notes = []
        tokenizer = self.chargpt.load_tokenizer({"type": "chars", "chars": sorted(set("hello world"))})
        self.assertEqual(self.chargpt.sampling_prompt("", tokenizer, notes.append), " ")  # no newline to start at
        self.assertEqual(len(notes), 1)
        self.assertEqual(self.chargpt.sampling_prompt("hello", tokenizer, notes.append), "hello")
        with self.assertRaisesRegex(ValueError, r"\['H', 'é'\]"):
            self.chargpt.sampling_prompt("Hé llo", tokenizer, notes.append)
        with self.assertRaisesRegex(ValueError, r"\['\\n'\]"):  # a newline the user asks for must be in the text
            self.chargpt.sampling_prompt("\n", tokenizer, notes.append)
        self.assertEqual(len(notes), 1)
        lines = self.chargpt.load_tokenizer({"type": "chars", "chars": sorted(set("hello\nworld"))})
        self.assertEqual(self.chargpt.sampling_prompt("", lines, notes.append), "\n")

    def test_default_prompt_is_the_one_of_mygpt_sample(self):
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, "run")
            run_script("chargpt/chargpt.py", "--trainer.max_iters=2", "--data.val_fraction=0",
                       *self.common(write_text(tmp, "numbers.txt", self.TEXT), work_dir))
            ckpt = os.path.join(work_dir, "checkpoint.pt")
            ours = run_script("chargpt/chargpt.py", "--system.mode=sample", f"--system.work_dir={work_dir}",
                              "--sample.length=40", "--system.seed=5")
            theirs = subprocess.run([sys.executable, "-m", "mygpt", "sample", ckpt, "--max-new-tokens", "40",
                                     "--greedy"], capture_output=True, text=True, cwd=ROOT, timeout=300)
            self.assertEqual(theirs.returncode, 0, theirs.stderr)
            self.assertTrue(ours.startswith("\n") and theirs.stdout.startswith("\n"), (ours, theirs.stdout))
            model = self.chargpt.GPT.from_checkpoint(ckpt)
            tokenizer = self.chargpt.load_tokenizer(load_checkpoint(ckpt)["tokenizer"])
            greedy = model.generate(torch.tensor([tokenizer.encode("\n")]), 40, do_sample=False)[0].tolist()
            self.assertEqual(theirs.stdout, tokenizer.decode(greedy) + "\n")


@process_level
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

    def png_size(self, path):
        from PIL import Image
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        with Image.open(path) as im:
            im.load()
            return im.size

    def test_killed_run_keeps_its_work_resumes_and_samples_from_its_checkpoint(self):
        with tempfile.TemporaryDirectory() as tmp:
            args = [f"--system.work_dir={tmp}", "--sample.n=8", "--sample.columns=4", "--sample.scale=2", *TINY_MODEL]
            ckpt_path = os.path.join(tmp, "checkpoint.pt")
            # a run far too long to finish, stopped by SIGTERM (what `timeout` and schedulers send) once it
            # has written a periodic checkpoint
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.Popen([sys.executable, str(PROJECTS / "image-gpt" / "imagegpt.py"), *args,
                                     "--trainer.max_iters=1000000", "--trainer.ckpt_interval=5"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            try:
                deadline = time.monotonic() + 120
                while not os.path.exists(ckpt_path) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=60)
            finally:
                proc.kill()
            self.assertEqual(proc.returncode, 0, err)
            self.assertIn("expected duration of the default run", out)
            self.assertIn("continue this run with --trainer.resume=True", out)
            self.assertFalse(os.path.exists(os.path.join(tmp, "samples.png")))  # no samples from a stopped run
            ckpt = load_checkpoint(ckpt_path)
            stopped_at, pixels = ckpt["iter_num"], ckpt["tokenizer"]
            self.assertGreaterEqual(stopped_at, 5)
            self.assertEqual((pixels["type"], len(pixels["colours"]), pixels["height"], pixels["width"]),
                             ("palette", 16, 8, 8))
            self.assertEqual(sum(pixels["first_token_counts"]), 1438)  # one first pixel per training image

            run_script("image-gpt/imagegpt.py", *args, fails=True)  # a new run would replace it: refused
            out = run_script("image-gpt/imagegpt.py", f"--trainer.max_iters={stopped_at + 5}", "--trainer.resume=True",
                             *args)
            self.assertIn(f"resumed from {ckpt_path} at iteration {stopped_at}", out)
            self.assertRegex(out, r"val loss per token: \d+\.\d+")
            ckpt = load_checkpoint(ckpt_path)
            self.assertEqual((ckpt["iter_num"], ckpt["tokenizer"]), (stopped_at + 5, pixels))
            # two 4x2 grids of 8x8 images with 1-pixel lines, a 2-pixel gap, all scaled by 2
            self.assertEqual(self.png_size(os.path.join(tmp, "samples.png")), (2 * (2 * (4 * 9 + 1) + 2), 2 * (2 * 9 + 1)))

            out = run_script("image-gpt/imagegpt.py", "--system.mode=sample", f"--system.work_dir={tmp}",
                             "--sample.n=6", "--sample.columns=3", "--sample.scale=3", "--sample.file=more.png")
            self.assertIn("more.png", out)
            # samples only: a 3x2 grid of 8x8 images with 1-pixel lines, scaled by 3
            self.assertEqual(self.png_size(os.path.join(tmp, "more.png")), (3 * (3 * 9 + 1), 3 * (2 * 9 + 1)))


if __name__ == "__main__":
    unittest.main()
