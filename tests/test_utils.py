import contextlib
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from mygpt.checkpoint import CheckpointError, save_checkpoint
from mygpt.utils import (_STALE_SECONDS, CfgNode, InUseError, UsageError, atomic_path, check_device, exclusive,
                         run_main, set_seed, setup_logging, temporary_name)
from tests.helpers import detach_log_handlers, process_level

PROJECTS = Path(__file__).resolve().parent.parent / "projects"


def load_project(folder, script):
    """A project script imported from its path (its folder on sys.path only while it imports its neighbours)."""
    folder = PROJECTS / folder
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"utils_test_{folder.name}", folder / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:  # leave no module named like a project file for other tests
            if getattr(sys.modules[name], "__file__", None) and Path(sys.modules[name].__file__).parent == folder:
                del sys.modules[name]
    return module


def run_help(merge, *args, **kwargs):
    """What merge(args) prints and the exit code it raises SystemExit with."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            merge(list(args), **kwargs)
        except SystemExit as exit:
            return out.getvalue(), exit.code
    raise AssertionError(f"{args} did not exit; it printed {out.getvalue()!r}")


def help_lines(text):
    """(override, type) of each key line of format_help: '  --model.n_layer=3   int'."""
    return [m.groups() for m in re.finditer(r"^  (--\S+?=.*?) {2,}(\S.*)$", text, re.M)]


class TestCfgNode(unittest.TestCase):
    def make(self):
        return CfgNode(model=CfgNode(n_layer=3, model_type="gpt-mini", time_weighting=None, pos_emb=True),
                       trainer=CfgNode(batch_size=64, learning_rate=3e-4, betas=(0.9, 0.95), milestones=[10, 20]),
                       sample=CfgNode(prompt="\n"))

    def merged(self, key, text):
        c = self.make()
        c.merge_from_args([f"--{key}={text}"])
        group, leaf = key.split(".")
        return getattr(getattr(c, group), leaf)

    def test_merge_from_args_parses_literals(self):
        c = self.make()
        c.merge_from_args(["--model.n_layer=4", "--model.model_type=gpt-nano",
                           "--model.time_weighting='full'", "--trainer.betas=(0.9,0.99)"])
        self.assertEqual(c.model.n_layer, 4)
        self.assertEqual(c.model.model_type, "gpt-nano")
        self.assertEqual(c.model.time_weighting, "full")
        self.assertEqual(c.trainer.betas, (0.9, 0.99))

    def test_bool_spellings(self):
        for text, value in [("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True),
                            ("false", False), ("False", False), ("0", False), ("no", False), ("No", False)]:
            with self.subTest(text=text):
                self.assertIs(self.merged("model.pos_emb", text), value)
        for text in ("maybe", "2", "", "on", "1.0"):
            with self.subTest(text=text), self.assertRaisesRegex(ValueError, "model.pos_emb wants a bool"):
                self.merged("model.pos_emb", text)

    def test_int_values(self):
        for text, value in [("1000", 1000), ("1_000", 1000), ("1e3", 1000), ("-3", -3), ("+7", 7), (" 8 ", 8)]:
            with self.subTest(text=text):
                got = self.merged("trainer.batch_size", text)
                self.assertEqual(got, value)
                self.assertIs(type(got), int)
        with self.assertRaises(ValueError) as caught:
            self.merged("trainer.batch_size", "abc")
        self.assertEqual(str(caught.exception), "trainer.batch_size wants an int, got 'abc'")
        for text in ("2.5", "True", "'32'", "(1, 2)"):
            with self.subTest(text=text), self.assertRaisesRegex(ValueError, "trainer.batch_size wants an int"):
                self.merged("trainer.batch_size", text)

    def test_float_values(self):
        for text, value in [("3e-4", 3e-4), ("1", 1.0), ("0.001", 0.001), ("-2.5", -2.5)]:
            with self.subTest(text=text):
                got = self.merged("trainer.learning_rate", text)
                self.assertEqual(got, value)
                self.assertIs(type(got), float)
        for text in ("fast", "True", "[1e-3]"):
            with self.subTest(text=text), self.assertRaisesRegex(ValueError, "trainer.learning_rate wants a float"):
                self.merged("trainer.learning_rate", text)

    def test_text_values_are_taken_as_written(self):
        for text, value in [("1984", "1984"), ('"ROMEO:"', "ROMEO:"), ("'ROMEO:'", "ROMEO:"), ("", ""),
                            ("none", "none"), ("'None'", "None"), ("C:\\new", "C:\\new"), ("'\\n'", "\n"),
                            ('"it\'s"', "it's"), ("'a'b'", "a'b"), ("(1, 2)", "(1, 2)"), ("a=b", "a=b")]:
            with self.subTest(text=text):
                self.assertEqual(self.merged("sample.prompt", text), value)
        self.assertIsNone(self.merged("sample.prompt", "None"))

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_any_text_round_trips(self, text):
        self.assertEqual(self.merged("sample.prompt", repr(text)), text)  # quoted as --help shows defaults
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if not quoted and text != "None":
            self.assertEqual(self.merged("sample.prompt", text), text)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(), st.floats(allow_nan=False))
    def test_numbers_round_trip(self, i, x):
        self.assertEqual(self.merged("trainer.batch_size", str(i)), i)
        self.assertEqual(self.merged("trainer.learning_rate", repr(x)), x)

    def test_tuples_and_lists_match_their_default(self):
        for text in ("(0.9,0.99)", "0.9, 0.99", "[0.9, 0.99]"):
            with self.subTest(text=text):
                self.assertEqual(self.merged("trainer.betas", text), (0.9, 0.99))
        got = self.merged("trainer.betas", "(1, 1)")
        self.assertEqual([type(x) for x in got], [float, float])
        with self.assertRaisesRegex(ValueError, r"trainer.betas wants a tuple \(float, float\), got \(0.9,\)"):
            self.merged("trainer.betas", "(0.9,)")
        with self.assertRaisesRegex(ValueError, r"trainer.betas\[1\] wants a float, got 'a'"):
            self.merged("trainer.betas", "(0.9, 'a')")
        with self.assertRaisesRegex(ValueError, "trainer.betas wants a tuple"):
            self.merged("trainer.betas", "0.9")
        self.assertEqual(self.merged("trainer.milestones", "[5, 6, 7]"), [5, 6, 7])
        self.assertEqual(self.merged("trainer.milestones", "(5,)"), [5])
        with self.assertRaisesRegex(ValueError, r"trainer.milestones\[0\] wants an int"):
            self.merged("trainer.milestones", "[1.5]")

    def test_none_defaults_read_a_literal_or_the_text(self):
        for text, value in [("4", 4), ("full", "full"), ("'full'", "full"), ("book.txt", "book.txt"),
                            ("(1, 2)", (1, 2)), ("None", None), ("none", None), ("null", None), ("True", True)]:
            with self.subTest(text=text):
                self.assertEqual(self.merged("model.time_weighting", text), value)

    def test_none_is_taken_by_every_key(self):
        for key in ("model.n_layer", "model.pos_emb", "trainer.learning_rate", "trainer.betas", "trainer.milestones"):
            with self.subTest(key=key):
                self.assertIsNone(self.merged(key, "None"))
                self.assertIsNone(self.merged(key, "null"))

    def test_unknown_key_names_the_closest(self):
        c = self.make()
        for arg, closest in [("--model.n_layers=4", "model.n_layer"), ("--batch_size=32", "trainer.batch_size"),
                             ("--model.batch_size=8", "trainer.batch_size"), ("--trainer.beta=(1,1)", "trainer.betas"),
                             ("--modl.n_layer=2", "model.n_layer")]:
            with self.subTest(arg=arg), self.assertRaisesRegex(KeyError, f"did you mean '{re.escape(closest)}'"):
                c.merge_from_args([arg])
        with self.assertRaisesRegex(KeyError, r"unknown config key 'optim.xyz' \(--help lists every key\)"):
            c.merge_from_args(["--optim.xyz=1"])
        with self.assertRaisesRegex(KeyError, "did you mean 'trainer.batch_size'"):
            c.merge_from_dict({"trainer": {"batchsize": 1}})
        with self.assertRaisesRegex(KeyError, r"unknown config key 'trainer.qqq' \(the keys here: batch_size, betas"):
            c.merge_from_dict({"trainer": {"qqq": 1}})
        self.assertEqual(c, self.make())  # nothing was half-applied

    def test_malformed_overrides(self):
        c = self.make()
        for arg, error, message in [("model.n_layer=4", ValueError, "expected an override like"),
                                    ("--model.n_layer", ValueError, "expected an override like"),
                                    ("--model=3", KeyError, "'model' is a config group, not a value"),
                                    ("--model.n_layer.x=1", KeyError, "'model.n_layer' is a value, not a config group")]:
            with self.subTest(arg=arg), self.assertRaisesRegex(error, message):
                c.merge_from_args([arg])
        with self.assertRaisesRegex(TypeError, "args must be a list of strings"):
            c.merge_from_args("--model.n_layer=4")
        with self.assertRaisesRegex(TypeError, "'model' is a config group; give a dict"):
            c.merge_from_dict({"model": 3})

    def test_merge_from_dict_takes_python_values_as_they_are(self):
        c = self.make()
        c.merge_from_dict({"model": {"n_layer": "4"}, "trainer": CfgNode(betas=[0.8, 0.9])})
        self.assertEqual(c.model.n_layer, "4")  # dicts come from code (checkpoints, tests): no parsing
        self.assertEqual(c.trainer.betas, [0.8, 0.9])
        self.assertEqual(c.trainer.batch_size, 64)

    def test_merge_from_dict_and_to_dict_round_trip(self):
        c = self.make()
        d = c.to_dict()
        d["model"]["n_layer"] = 7
        c.merge_from_dict(d)
        self.assertEqual(c.model.n_layer, 7)
        self.assertEqual(c.to_dict(), d)
        self.assertIn("n_layer: 7", str(c))

    def test_help_lists_every_key_with_default_and_type_and_exits_0(self):
        for flag in ("--help", "-h"):
            c = self.make()
            out, code = run_help(c.merge_from_args, "--model.n_layer=9", flag, description="Trains a thing.\n")
            self.assertEqual(code, 0)
            self.assertEqual(c, self.make())  # help changes nothing
            self.assertIn("Trains a thing.", out)
            self.assertEqual(help_lines(out), [
                ("--model.n_layer=3", "int"), ("--model.model_type='gpt-mini'", "str"),
                ("--model.time_weighting=None", "literal or text"), ("--model.pos_emb=True", "bool"),
                ("--trainer.batch_size=64", "int"), ("--trainer.learning_rate=0.0003", "float"),
                ("--trainer.betas=(0.9, 0.95)", "tuple (float, float)"), ("--trainer.milestones=[10, 20]", "list of int"),
                ("--sample.prompt='\\n'", "str")])
        self.assertEqual(out.strip(), c.format_help("Trains a thing.").strip())

    def test_every_project_config_takes_typical_overrides_and_its_help_round_trips(self):
        projects = {  # the overrides the projects' READMEs show, and what each must give
            ("adder", "adder.py"): {"data.ndigit=3": 3, "model.time_weighting=full": "full",
                                    "trainer.max_iters=3e3": 3000, "system.work_dir=out/x": "out/x",
                                    "trainer.resume=true": True},
            ("chargpt", "chargpt.py"): {"data.input_file=book.txt": "book.txt", "system.mode=sample": "sample",
                                        "sample.prompt=1984": "1984", "sample.length=500": 500,
                                        "trainer.betas=(0.9,0.99)": (0.9, 0.99), "model.pos_emb=None": None,
                                        "model.token_shift=True": True, "trainer.learning_rate=3e-4": 3e-4},
            ("image-gpt", "imagegpt.py"): {"data.dataset=folder": "folder", "data.folder=photos": "photos",
                                           "data.image_size=16": 16, "sample.n=8": 8, "trainer.eval_iters=None": None,
                                           "sample.top_k=10": 10, "model.n_embd=96": 96},
        }
        for (folder, script), expected in projects.items():
            with self.subTest(project=folder):
                module = load_project(folder, script)
                default, config = module.get_config(), module.get_config()
                config.merge_from_args([f"--{override}" for override in expected])
                for override, value in expected.items():
                    self.assertEqual(_get(config, override.split("=")[0]), value, override)
                    self.assertIs(type(_get(config, override.split("=")[0])), type(value), override)

                out, code = run_help(module.main, "--help")
                self.assertEqual(code, 0)
                lines = help_lines(out)
                leaves = list(_leaf_keys(default))
                self.assertEqual([left.split("=")[0][2:] for left, _ in lines], leaves)
                again = module.get_config()
                again.merge_from_args([left for left, _ in lines])  # every default, written as --help shows it
                self.assertEqual(again, default)
                for key in leaves:
                    self.assertIs(type(_get(again, key)), type(_get(default, key)), key)


def _get(node, dotted):
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _leaf_keys(node, prefix=""):
    for key, value in node.__dict__.items():
        if isinstance(value, CfgNode):
            yield from _leaf_keys(value, prefix + key + ".")
        else:
            yield prefix + key


@process_level
class TestExclusive(unittest.TestCase):
    HOLD = "import sys, time; from mygpt.utils import exclusive\nwith exclusive(sys.argv[1]):\n print('held', flush=True); time.sleep(60)"

    def test_a_second_process_is_refused_until_the_first_dies(self):
        with tempfile.TemporaryDirectory() as folder:
            holder = subprocess.Popen([sys.executable, "-c", self.HOLD, folder], stdout=subprocess.PIPE, text=True)
            try:
                self.assertEqual(holder.stdout.readline(), "held\n")
                with self.assertRaisesRegex(InUseError, f"in use by process {holder.pid} "):
                    with exclusive(folder):
                        pass
            finally:
                holder.send_signal(signal.SIGKILL)  # as the OOM killer would: no cleanup runs
                holder.wait()
                holder.stdout.close()
            with exclusive(folder):  # the dead process's lock is gone with it
                with exclusive(folder):  # and this process may take it again inside itself
                    pass


@process_level
class TestAtomicPath(unittest.TestCase):
    def test_refuses_what_is_not_a_regular_file(self):
        with tempfile.TemporaryDirectory() as folder:
            fifo = os.path.join(folder, "fifo")
            os.mkfifo(fifo)
            for target, kind in ((fifo, "not a regular file"), (folder, "a folder")):
                with self.assertRaisesRegex(ValueError, kind), atomic_path(target) as tmp:
                    open(tmp, "w").close()
            self.assertEqual(sorted(os.listdir(folder)), ["fifo"])

    def test_a_killed_writers_temporary_is_removed_by_the_next_save_and_the_next_run(self):
        write = ("import sys, time; from mygpt.utils import atomic_path\n"
                 "with atomic_path(sys.argv[1]) as tmp:\n tmp.write_bytes(b'half a checkpoint'); print(1, flush=True);"
                 " time.sleep(60)")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "checkpoint.pt")
            killed = subprocess.Popen([sys.executable, "-c", write, path], stdout=subprocess.PIPE, text=True)
            with killed.stdout:
                killed.stdout.readline()
                killed.send_signal(signal.SIGKILL)  # as the OOM killer or a lost node would: no cleanup runs
                killed.wait()
            left = os.listdir(folder)
            self.assertEqual(len(left), 1)
            self.assertRegex(left[0], rf"^checkpoint\.pt\.tmp-{killed.pid}-[0-9a-f]{{8}}$")
            # beside it: a temporary of a live process (this one), and another file's of the dead one
            mine = Path(temporary_name(path))
            other = Path(folder, f"best.pt.tmp-{killed.pid}-0123abcd")
            for tmp in (mine, other):
                tmp.write_bytes(b"in progress")
            save_checkpoint({"a": 1}, path)
            self.assertEqual(sorted(os.listdir(folder)), sorted([left[0], mine.name, other.name, "checkpoint.pt"]),
                             "a temporary changed within the last minute may be another machine's: kept")
            old = time.time() - 2 * _STALE_SECONDS
            for name in (left[0], mine.name, other.name):
                os.utime(os.path.join(folder, name), (old, old))
            save_checkpoint({"a": 2}, path)  # removes the dead writer's temporary of this file only
            self.assertEqual(sorted(os.listdir(folder)), sorted([mine.name, other.name, "checkpoint.pt"]))
            setup_logging(CfgNode(system=CfgNode(work_dir=folder)))  # a new run in the folder: every dead one's
            self.assertEqual(sorted(os.listdir(folder)), sorted([mine.name, "checkpoint.pt", "config.json", "log.txt"]))
            detach_log_handlers()
            os.remove(mine)


class TestSetSeed(unittest.TestCase):
    def test_repeatable(self):
        set_seed(3)
        a = (torch.rand(3), np.random.rand(2))
        set_seed(3)
        b = (torch.rand(3), np.random.rand(2))
        self.assertTrue(torch.equal(a[0], b[0]))
        self.assertTrue(np.array_equal(a[1], b[1]))


if __name__ == "__main__":
    unittest.main()


class TestRunMain(unittest.TestCase):
    """run_main, the shared end of every project script and of the mygpt command."""

    def run_main(self, error):
        def main(argv):
            self.assertEqual(argv, ["--x=1"])
            raise error
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = run_main(main, ["--x=1"], prog="tool.py")
        return status, stderr.getvalue()

    def test_user_errors_are_one_line_with_the_cli_status(self):
        cases = [(FileExistsError("out/run/checkpoint.pt exists"), 1, "out/run/checkpoint.pt exists"),
                 (ValueError("--data.input_file a.txt is empty\nsecond line"), 1,
                  "--data.input_file a.txt is empty second line"),
                 (UsageError("--x wants an int, got 'a'"), 2, "--x wants an int, got 'a'"),
                 (KeyError("unknown config key 'x.y'"), 1, "unknown config key 'x.y'"),  # not quoted twice
                 (CheckpointError("ckpt.pt is damaged"), 1, "ckpt.pt is damaged"),
                 (InUseError("out is in use by process 7"), 1, "out is in use by process 7")]
        for error, status, message in cases:
            with self.subTest(error=repr(error)):
                self.assertEqual(self.run_main(error), (status, f"tool.py: error: {message}\n"))
        self.assertEqual(self.run_main(KeyboardInterrupt()), (130, "\n"))

    def test_config_errors_are_usage_errors(self):
        config = CfgNode(trainer=CfgNode(batch_size=4))
        for args in (["--trainer.batch_size=x"], ["--trainer.bach_size=3"], ["trainer.batch_size=3"]):
            with self.subTest(args), self.assertRaises(UsageError):
                config.merge_from_args(args)

    def test_bugs_keep_their_traceback(self):
        with self.assertRaises(AttributeError):
            self.run_main(AttributeError("'NoneType' object has no attribute 'x'"))

    def test_what_main_returns_is_the_status(self):
        self.assertEqual(run_main(lambda argv: 3, []), 3)
        self.assertEqual(run_main(lambda argv: {"val_loss": 1.0}, []), 0)  # gpt2/train.py --eval_only returns a dict


class TestCheckDevice(unittest.TestCase):
    def test_devices_this_machine_lacks_are_refused_naming_the_option(self):
        check_device("cpu")
        check_device("auto")
        with self.assertRaisesRegex(ValueError, r"--trainer.device='gpu' is not a device: give cpu, cuda"):
            check_device("gpu", "--trainer.device")
        count = torch.cuda.device_count()
        with self.assertRaisesRegex(ValueError, "--trainer.device=cuda:.*(without CUDA|GPU)"):
            check_device(f"cuda:{count}", "--trainer.device")  # one beyond the last GPU, also where there are some
        with self.assertRaisesRegex(ValueError, r"--system.seed must be an int from 0 to 2\*\*32 - 1"):
            set_seed(2**32, "--system.seed")
