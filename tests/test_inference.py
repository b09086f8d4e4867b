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
