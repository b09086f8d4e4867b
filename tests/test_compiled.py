"""compile=True in training and in cached decoding: a failing compile falls back to eager mode with one line, and
a compiled decode step gives eager's tokens. Failures are injected as a torch.compile backend that raises, so
nothing here needs a C compiler; the one test that runs inductor skips, saying why, where it cannot compile.
torch._dynamo is imported inside the tests: it imports Triton, which test_kernels must set up first."""

import contextlib
import io
import unittest
import warnings
from unittest.mock import patch

import torch

from mygpt.compiled import _MAX_CAUSE, _cause
from mygpt.generate import _compiled_decode_step
from mygpt.quantize import Int8Linear
from mygpt.trainer import Trainer
from tests.helpers import process_level, tiny_model
from tests.trainer_run import CountingData, TinyLM, config

NO_COMPILER = "no C compiler here"


def failing_backend(gm, example_inputs):
    raise RuntimeError(NO_COMPILER)


def fails_at_second_graph():
    """A backend that compiles the first graph it is given (to run as traced) and fails on the second."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) > 1:
            raise RuntimeError(NO_COMPILER)
        return gm.forward
    return backend


class SplitLM(TinyLM):
    """TinyLM with a graph break after its dropout: compiled, the first piece runs (drawing a dropout mask)
    before the second is compiled."""

    def forward(self, x, y=None):
        h = self.drop(self.emb(x))
        torch._dynamo.graph_break()
        logits = self.head(h)
        loss = None if y is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                                        ignore_index=-1)
        return logits, loss


def train(model, **overrides):
    """(trainer, what it printed) after 3 steps."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = Trainer(config(max_iters=3, **overrides), model, CountingData(64)).run()
    return trainer, out.getvalue()


class CompileTest(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()  # every test compiles from scratch, with its own backend

    def assertOneWarning(self, text, what):
        lines = text.strip().splitlines()
        self.assertEqual(len(lines), 1, text)
        self.assertIn(f"warning: torch.compile could not compile {what} (RuntimeError: {NO_COMPILER}", lines[0])
        self.assertTrue(lines[0].endswith("; running it in eager mode"), lines[0])


class TestTrainingFallback(CompileTest):
    def test_a_failing_compile_trains_as_eager_mode_does(self):
        torch.manual_seed(0)
        eager, _ = train(SplitLM())
        for backend in (failing_backend, fails_at_second_graph()):
            with self.subTest(backend=backend.__name__), patch("mygpt.compiled._BACKEND", backend):
                torch.manual_seed(0)
                trainer, printed = train(SplitLM(), compile=True)
                self.assertOneWarning(printed, "the model")
                # the same dropout masks as eager mode: the RNG states were put back before the step ran again
                self.assertEqual([h["loss"] for h in trainer.history], [h["loss"] for h in eager.history])
                for got, want in zip(trainer.model.parameters(), eager.model.parameters()):
                    self.assertTrue(torch.equal(got, want))

    def test_compiled_training_matches_eager(self):
        from torch._dynamo.testing import CompileCounterWithBackend
        counter = CompileCounterWithBackend("aot_eager")  # the compile path without building C++
        runs = []
        for compile in (False, True):
            torch.manual_seed(0)
            with patch("mygpt.compiled._BACKEND", counter):
                runs.append(train(TinyLM(dropout=0.0), compile=compile))
        self.assertEqual(counter.frame_count, 1)
        self.assertEqual(runs[1][1], "")  # nothing to say
        for got, want in zip(runs[1][0].model.parameters(), runs[0][0].model.parameters()):
            torch.testing.assert_close(got, want)


class TestDecoding(CompileTest):
    def test_compiled_decoding_gives_eager_tokens_from_one_graph(self):
        variants = [{}, dict(time_weighting="circulant", token_shift=True), dict(time_weighting="full", pos_emb=None),
                    dict(pos_emb="rope", n_kv_head=2, qk_norm=True)]
        for variant in variants:
            with self.subTest(**variant):
                torch._dynamo.reset()
                model = tiny_model(**variant)
                prompt = torch.randint(0, 13, (2, 3))
                # a recompile would raise, fall back to eager mode and warn: the cache's length is a symbol
                with patch("mygpt.compiled._BACKEND", "aot_eager"), self.assertNoLogs("mygpt", "WARNING"), \
                        torch._dynamo.config.patch(error_on_recompile=True):
                    # 20 tokens pass block_size 16: the cache grows to the full block, then the window slides
                    got = model.generate(prompt, 20, compile=True)
                self.assertIsNone(_compiled_decode_step(model).failure)
                self.assertTrue(torch.equal(got, model.generate(prompt, 20)))

    def test_a_failing_compile_decodes_in_eager_mode_said_once_per_model(self):
        model = tiny_model(token_shift=True)
        prompt = torch.randint(0, 13, (2, 3))
        with patch("mygpt.compiled._BACKEND", failing_backend), self.assertLogs("mygpt", "WARNING") as logs:
            got = [model.generate(prompt, 8, compile=True) for _ in range(2)]
        self.assertOneWarning("\n".join(r.getMessage() for r in logs.records), "the decode step")
        for tokens in got:
            self.assertTrue(torch.equal(tokens, model.generate(prompt, 8)))

    def test_the_int8_model_decodes_in_eager_mode(self):
        qmodel = tiny_model().quantize()
        if any(m.packed() is False for m in qmodel.modules() if isinstance(m, Int8Linear)):
            self.skipTest("this build has no int8 kernels: the int8 model runs fp32 products, which compile")
        prompt = torch.randint(0, 13, (1, 3))
        # dynamo cannot trace the kernels' packed weights: the failure comes before any backend runs
        with patch("mygpt.compiled._BACKEND", "eager"), self.assertLogs("mygpt", "WARNING") as logs:
            got = qmodel.generate(prompt, 6, compile=True)
        self.assertEqual(len(logs.records), 1)
        self.assertRegex(logs.records[0].getMessage(), r"could not compile the decode step \(.+, at quantize\.py:\d+\)")
        self.assertTrue(torch.equal(got, qmodel.generate(prompt, 6)))

    @process_level  # inductor builds C++ in worker processes
    def test_inductor_decoding_gives_eager_tokens(self):
        model = tiny_model(time_weighting="circulant", token_shift=True)
        prompt = torch.randint(0, 13, (1, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # inductor's own use of torch.jit, on this torch
            got = model.generate(prompt, 12, compile=True)
        failure = _compiled_decode_step(model).failure
        if failure is not None:
            self.skipTest(f"inductor cannot compile on this machine: {failure}")
        self.assertTrue(torch.equal(got, model.generate(prompt, 12)))

    def test_bad_compile_argument(self):
        with self.assertRaisesRegex(TypeError, "compile must be True or False, got 'yes'"):
            tiny_model().generate(torch.zeros(1, 1, dtype=torch.long), 1, compile="yes")


class TestCause(unittest.TestCase):
    def test_one_line_with_the_innermost_error_and_where(self):
        from torch._dynamo.exc import BackendCompilerFailed
        inner = ValueError("first line\n" + "more\n" * 300)
        error = BackendCompilerFailed(failing_backend, inner, None)
        error.args = (str(error) + '\nfrom user code:\n   File "/a/b/model.py", line 42, in forward\n',)
        self.assertEqual(_cause(error), "ValueError: first line, at model.py:42")
        long = _cause(BackendCompilerFailed(failing_backend, ValueError("x" * 1000), None))
        self.assertEqual(len(long), _MAX_CAUSE)
        self.assertTrue(long.startswith("ValueError: xxx") and long.endswith("..."))


if __name__ == "__main__":
    unittest.main()
