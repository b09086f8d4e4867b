import unittest
from unittest import mock

import torch

from mygpt import GPT, inference_precision, precision_context
from tests.helpers import tiny_config


def model_of(n_embd, vocab_size=64):
    torch.manual_seed(0)
    return GPT(tiny_config(n_embd=n_embd, vocab_size=vocab_size, block_size=16)).eval()


def never(dtype):
    raise AssertionError("nothing should have been timed")


class TestInferencePrecision(unittest.TestCase):
    def test_explicit_choices_are_kept_and_auto_times_the_callers_work(self):
        model = model_of(256)  # c_fc: 1024 x 256 weights, enough for the bf16 copy
        self.assertEqual(inference_precision(model, "fp32", never), "fp32")
        with mock.patch("mygpt.precision.native", return_value=True):
            self.assertEqual(inference_precision(model, "bf16", never), "bf16")
            timed = []
            with mock.patch("mygpt.precision._probe", side_effect=lambda step: [step(d) for d in (None, torch.bfloat16)]
                            and (2.0, 1.0)), self.assertLogs("mygpt", "INFO") as logs:
                self.assertEqual(inference_precision(model, "auto", timed.append), "bf16")
        self.assertEqual(timed, [None, torch.bfloat16])
        self.assertEqual(len(logs.output), 1)
        self.assertIn("precision='auto': bf16", logs.output[0])

    def test_auto_is_fp32_without_timing_where_bf16_cannot_pay(self):
        with mock.patch("mygpt.precision.native", return_value=False):
            self.assertEqual(inference_precision(model_of(256), "auto", never), "fp32")
        with mock.patch("mygpt.precision.native", return_value=True), self.assertLogs("mygpt", "INFO") as logs:
            self.assertEqual(inference_precision(model_of(32), "auto", never), "fp32")  # small weights
            self.assertEqual(inference_precision(model_of(256).quantize(layers="all"), "auto", never), "fp32")
        self.assertIn("every weight matrix is small", logs.output[0])
        self.assertIn("int8 model", logs.output[1])

    def test_score_chooses_by_the_same_rule_and_scores_as_it_chose(self):
        """score(precision='auto'), as `mygpt eval --data` does: fp32 without timing where the weights are small
        or bf16 is not native, else the timed forward decides; the scores are autocast's in the precision chosen."""
        from mygpt import score
        from mygpt.evaluate import score_batches
        model = model_of(256, vocab_size=1024)
        tokens = torch.randint(1024, (200,), generator=torch.Generator().manual_seed(0))

        class Windows:  # what score reads of a TokenDataset: len() and get_batch(indices) -> (x, y)
            def __len__(self):
                return 12

            def get_batch(self, indices):
                return tuple(torch.stack([tokens[16 * i + d:16 * i + d + 16] for i in indices]) for d in (0, 1))
        windows = Windows()
        batches = [windows.get_batch(list(range(i, min(i + 4, len(windows))))) for i in range(0, 8, 4)]
        fp32 = score_batches(model, batches)
        bf16 = score_batches(model, batches, dtype=torch.bfloat16)
        self.assertNotEqual(fp32.nats, bf16.nats)
        with mock.patch("mygpt.precision.native", return_value=False):
            self.assertEqual(score(model, windows, 4, max_batches=2, precision="auto").nats, fp32.nats)
        with mock.patch("mygpt.precision.native", return_value=True):
            small = model_of(32, vocab_size=1024)  # every weight matrix small: fp32, not timed
            self.assertEqual(score(small, windows, 4, max_batches=2, precision="auto").nats,
                             score_batches(small, batches).nats)
            for times, want, other in (((2.0, 1.0), bf16, fp32), ((1.0, 1.0), fp32, bf16)):
                with mock.patch("mygpt.precision._probe", return_value=times):
                    got = score(model, windows, 4, max_batches=2, precision="auto")
                # bf16 from the weights cast once: autocast's numbers up to the order of its sums
                self.assertLess(abs(got.nats - want.nats), 0.1 * abs(got.nats - other.nats))

    def test_bad_input(self):
        model = model_of(32)
        with self.assertRaisesRegex(ValueError, r"precision must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"):
            inference_precision(model, "fp16", never)
        with self.assertRaisesRegex(ValueError, "'bf16' is for fp32 models: an int8 model .* 'fp32' or 'auto'"):
            inference_precision(model.quantize(layers="all"), "bf16", never)
        with mock.patch("mygpt.precision.native", return_value=False), self.assertLogs("mygpt", "WARNING") as logs:
            self.assertEqual(inference_precision(model, "bf16", never), "bf16")  # asked for: it runs, with a warning
        self.assertIn("no native bf16: bf16 is emulated, many times slower than fp32 (precision 'auto'", logs.output[0])
        with self.assertRaisesRegex(ValueError, "'fp32' or 'bf16' here, got 'auto'"):
            precision_context("auto")

    def test_bf16_decoding_keeps_the_fp32_tokens(self):
        """Greedy decoding in bf16 and in fp32, as bench/bench_llamacpp.py compares them (where the top two
        logits of a step are closer than bf16's rounding they could part: not at this seed); each product's
        own bound is tested in tests/test_model.py and tests/test_matvec.py."""
        model = model_of(256, vocab_size=1024)  # its c_fc and head reach the bf16 copy and mygpt.matvec
        idx = torch.randint(1024, (1, 4), generator=torch.Generator().manual_seed(1))
        fp32 = model.generate(idx, 8)
        with precision_context("bf16"):
            low = model.generate(idx, 8)
        self.assertEqual(low.tolist(), fp32.tolist())
        self.assertGreater(len(set(fp32[0, 4:].tolist())), 1)  # not one token repeated: the test can fail

if __name__ == "__main__":
    unittest.main()
