"""mygpt/decode.cpp's one-token step against model.forward with a KVCache, the reference it must reproduce."""

import os
import tempfile
import unittest
import warnings
from unittest import mock

import torch

from mygpt import decode, precision_context
from mygpt.generate import _decode_step, generate
from mygpt.matvec import QUANTIZED_X, Kernel
from mygpt.model import KVCache
from tests.helpers import VARIANTS, tiny_model

# every Linear of this shape is large enough for forward's matvec path (mygpt.matvec.MIN_WEIGHTS), as GPT-2's
WIDE = dict(n_layer=2, n_head=4, n_embd=384, vocab_size=400, block_size=24)


def both_steps(model, ids, prompt=5):
    """[(forward's logits, the C++ step's logits)] at each one-token step over ids (rows, T) after a prompt pass,
    each path with its own cache (the same tokens fed to both), and the two caches."""
    with torch.inference_mode():
        reference, cache = KVCache(model.config, ids.shape[0]), KVCache(model.config, ids.shape[0])
        _decode_step(model, ids[:, :prompt], reference)
        _decode_step(model, ids[:, :prompt], cache)
        step = decode.Step(model, cache, _decode_step)
        pairs = [(_decode_step(model, ids[:, i:i + 1], reference), step(model, ids[:, i:i + 1], cache))
                 for i in range(prompt, ids.shape[1])]
    return pairs, reference, cache, step


def largest_difference(pairs):
    """The largest |a - b| over every step, relative to that step's largest |a|."""
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in pairs)


class TestStep(unittest.TestCase):
    def setUp(self):
        torch.set_num_threads(1)
        self.assertTrue(decode._KERNEL.get() is not None, "decode.cpp did not build")

    def test_fp32_matches_forward_and_fills_the_same_cache(self):
        """Every time-weighting variant (with and without token shift and position embeddings), the modern recipe's
        switches (rotary positions, RMSNorm also after the embedding, QK-norm, ReLU², no biases, an untied head,
        soft-capped logits), SwiGLU with grouped-query attention, a LayerNorm after the embedding."""
        modern = dict(pos_emb="rope", norm="rmsnorm", embd_norm=True, qk_norm=True, mlp="relu2", bias=False,
                      tie_weights=False, logit_softcap=15.0)
        for kw in (*VARIANTS, modern, dict(modern, mlp="swiglu", n_kv_head=2), dict(n_kv_head=1, embd_norm=True),
                   dict(pos_emb="rope", time_weighting="circulant", token_shift=True),
                   dict(tie_weights=False, n_embd=48, n_head=3)):
            with self.subTest(**kw):
                model = tiny_model(**kw)
                ids = torch.randint(0, model.config.vocab_size, (1, model.config.block_size))
                pairs, reference, cache, step = both_steps(model, ids)
                self.assertIsInstance(step.table, torch.Tensor)  # the C++ step ran
                self.assertLess(largest_difference(pairs), 1e-5)
                self.assertEqual(cache.length, reference.length)
                for k, r in zip(cache.keys + cache.values, reference.keys + reference.values):  # the filled slots
                    torch.testing.assert_close(k[:, :, :cache.length], r[:, :, :cache.length], rtol=1e-5, atol=1e-6)
                if model.config.token_shift:  # each layer remembers this step's attention input, as forward does
                    for k, r in zip(cache.last_input, reference.last_input):
                        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6)

    def test_several_sequences_at_once(self):
        """Rows of one batch, each at its own tokens: every row as forward computes it (the weights read once)."""
        modern = dict(pos_emb="rope", norm="rmsnorm", embd_norm=True, qk_norm=True, mlp="swiglu", n_kv_head=2,
                      logit_softcap=15.0)
        for kw in (dict(), modern, dict(time_weighting="circulant", token_shift=True)):
            with self.subTest(**kw):
                model = tiny_model(**kw)
                ids = torch.randint(0, model.config.vocab_size, (3, 12))
                pairs, reference, cache, step = both_steps(model, ids)
                self.assertIsInstance(step.table, torch.Tensor)
                self.assertEqual(pairs[0][1].shape, (3, model.config.vocab_size))
                self.assertLess(largest_difference(pairs), 1e-5)
                for k, r in zip(cache.keys + cache.values, reference.keys + reference.values):  # the filled slots
                    torch.testing.assert_close(k[:, :, :cache.length], r[:, :, :cache.length], rtol=1e-5, atol=1e-6)
        prompt = torch.randint(0, model.config.vocab_size, (3, 4))
        self.assertTrue(torch.equal(generate(model, prompt, 14), generate(model, prompt, 14, use_cache=False)))
        self.assertFalse(decode.pays(model, decode.MAX_ROWS + 1))  # many rows: the forward's matrix products

    def test_bf16_and_int8_multiply_as_forward_does(self):
        """Each Linear gets the operands its forward multiplies one row by: the bf16 copy in bf16 (matvec's kind 1),
        the int8 weights with q8 x where the int8 kernel was chosen (kind 3). Rounding x to bf16 or to int8 blocks
        can fall either way where the norms' last bits differ, so the logits agree to a rounding step, not exactly."""
        model = tiny_model(**WIDE)
        ids = torch.randint(0, WIDE["vocab_size"], (2, 20))  # two sequences: each row's x is prepared apart
        for precision, quantized, kind, tolerance in (("bf16", model, 1, 0.02), ("fp32", model.quantize(), None, 0.03)):
            with self.subTest(precision=precision, quantized=quantized is not model):
                with precision_context(precision):
                    pairs, _, _, step = both_steps(quantized, ids)
                self.assertIsInstance(step.table, torch.Tensor)
                kinds = [step.table[10 + 2 + 3].item()]  # layer 0's c_attn (after ln_1's 2 entries): its kind
                lm_head_kind = step.table[9].item()  # the header's last entry
                if kind is None:  # int8: the kernel each layer's measurement chose
                    layer = quantized.transformer.h[0].attn.c_attn
                    kind = QUANTIZED_X if layer.int8_pays(1) is not False else 2
                    self.assertEqual(lm_head_kind, QUANTIZED_X if quantized.lm_head.int8_pays(1) is not False else 2)
                else:
                    self.assertEqual(lm_head_kind, kind)
                self.assertEqual(kinds, [kind])
                self.assertLess(largest_difference(pairs), tolerance)
                agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in pairs)
                self.assertGreaterEqual(agree, 2 * len(pairs) - 3)

    def test_generate_takes_it_and_gives_the_uncached_tokens(self):
        """Greedy tokens as without a cache, past the end of the block (where both re-run the window)."""
        model = tiny_model()
        prompt = torch.randint(0, model.config.vocab_size, (1, 4))
        calls = []
        built = decode._KERNEL.get()
        with mock.patch.object(decode._KERNEL, "fn", lambda *a: calls.append(1) or built(*a)):
            cached = generate(model, prompt, 20)
        self.assertTrue(torch.equal(cached, generate(model, prompt, 20, use_cache=False)))
        # one-token steps at cache lengths 4..15: the first runs forward, and so does the block's last slot (15)
        self.assertEqual(len(calls), 10)

    def test_a_forward_step_in_between_lays_the_table_out_again(self):
        """Token shift's remembered inputs are new tensors after a forward: the next C++ step must not write into the
        old ones."""
        model = tiny_model(time_weighting="circulant", token_shift=True)
        ids = torch.randint(0, model.config.vocab_size, (1, 10))
        with torch.inference_mode():
            cache, reference = KVCache(model.config, 1), KVCache(model.config, 1)
            step = decode.Step(model, cache, _decode_step)
            for c in (cache, reference):
                _decode_step(model, ids[:, :4], c)
            for i in range(4, 10):
                run = _decode_step if i == 6 else step
                a, b = _decode_step(model, ids[:, i:i + 1], reference), run(model, ids[:, i:i + 1], cache)
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    def test_plain_autocast_keeps_the_forward(self):
        """bf16 autocast without bf16_weight_copies() runs F.linear in bf16 (bf16 activations), which decode.cpp does
        not compute: every step stays in the forward."""
        model = tiny_model(**WIDE)
        ids = torch.randint(0, WIDE["vocab_size"], (1, 8))
        with torch.autocast("cpu", torch.bfloat16):
            pairs, _, _, step = both_steps(model, ids)
        self.assertIs(step.table, False)
        self.assertTrue(all(torch.equal(a, b) for a, b in pairs))

    def test_an_autocast_change_lays_the_table_out_again(self):
        model = tiny_model(**WIDE)
        ids = torch.randint(0, WIDE["vocab_size"], (1, 8))
        with torch.inference_mode():
            cache, reference = KVCache(model.config, 1), KVCache(model.config, 1)
            step = decode.Step(model, cache, _decode_step)
            for c in (cache, reference):
                _decode_step(model, ids[:, :4], c)
            step(model, ids[:, 4:5], cache), _decode_step(model, ids[:, 4:5], reference)
            fp32_table = step.table
            with precision_context("bf16"):
                for i in (5, 6):
                    a, b = _decode_step(model, ids[:, i:i + 1], reference), step(model, ids[:, i:i + 1], cache)
            self.assertFalse(torch.equal(fp32_table, step.table))  # bf16 copies, kind 1
            self.assertLess(((a - b).abs().max() / a.abs().max()).item(), 0.02)


class TestWhere(unittest.TestCase):
    def test_models_it_cannot_run_say_why(self):
        model = tiny_model()
        self.assertIsNone(decode.unsupported(model))
        self.assertIsNone(decode.unsupported(model.quantize(layers="all")))
        self.assertEqual(decode.unsupported(tiny_model().to(torch.bfloat16)), "weights not fp32 on the CPU")
        replaced = tiny_model()
        replaced.transformer.h[0].mlp.c_fc = torch.nn.Linear(32, 128)  # a layer whose forward decode.cpp cannot know
        self.assertEqual(decode.unsupported(replaced), "layers that are not mygpt's")
        model.transformer.h[1].mlp.register_forward_hook(lambda *a: None)
        self.assertEqual(decode.unsupported(model), "forward hooks on transformer.h.1.mlp")

    def test_a_kernel_that_cannot_be_built_leaves_the_steps_to_forward(self):
        model = tiny_model()
        prompt = torch.randint(0, model.config.vocab_size, (1, 4))
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "decode.cpp")
            with open(source, "w") as f:
                f.write("this is not C++\n")
            broken = Kernel([source], decode._KERNEL.argtypes, "decoding runs model.forward")
            with mock.patch.object(decode, "_KERNEL", broken), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = generate(model, prompt, 8)
        self.assertEqual(len(caught), 1)
        self.assertIn("could not build decode.cpp", str(caught[0].message))
        self.assertTrue(torch.equal(out, generate(model, prompt, 8, use_cache=False)))


if __name__ == "__main__":
    unittest.main()
