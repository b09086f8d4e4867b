import functools
import os
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import mygpt.quantize as quantize_module
from mygpt.checkpoint import CheckpointError, save_checkpoint
from mygpt.model import GPT
from mygpt.quantize import Int8Embedding, Int8Linear, load_quantized, quantize, save_quantized
from tests.corpus import english_prose
from tests.helpers import VARIANTS, tiny_config



def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**{"n_embd": 64, "vocab_size": 65, "block_size": 32, **kw})).eval()  # 65 characters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_" in name:  # ones would hide indexing mistakes
                p.uniform_(0.2, 1.8)
    return model


TEXT = english_prose(40_000)
CHARS = sorted(set(TEXT))[:65]
DATA = torch.tensor([CHARS.index(c) if c in CHARS else 0 for c in TEXT])


@functools.lru_cache(maxsize=None)  # each is trained once for all tests; they only read it
def trained_model(steps=150, **kw):
    """A small character model trained briefly: its weights have the structure quantization must keep."""
    model = random_model(**kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(DATA) - 33, (16,), generator=g)
        x = torch.stack([DATA[j:j + 33] for j in i.tolist()])
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def held_out(n=32):
    start = len(DATA) - n * 33
    return DATA[start:].view(n, 33)


def emulated_int8_linear(layer, x, reduce_range):
    """What PyTorch's dynamic int8 Linear computes, written out in float64: x is rounded to uint8 with the
    per-tensor scale and zero point of PyTorch's ChooseQuantizationParams, then multiplied by Ŵ = q · scale.
    Returns (output, activation step)."""
    qmax = 127 if reduce_range else 255
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = float(torch.tensor((hi - lo) / qmax, dtype=torch.float32))
    # the zero point from whichever end loses less, nudged to an integer in [0, qmax]
    from_min, from_max = -lo / step, qmax - hi / step
    zero = from_min if -abs(lo / step) < qmax - abs(hi / step) else from_max
    zero = min(max(round(zero), 0), qmax)
    xq = torch.clamp(torch.round(x * (1 / torch.tensor(step)) + zero), 0, qmax)
    out = F.linear((xq.double() - zero) * step, layer.dequantized_weight().double(),
                   None if layer.bias is None else layer.bias.double())
    return out, step


def excess_over_rounding(layer, inp, out, reduce_range):
    """How far an Int8Linear's output lies beyond what rounding its input to one step can explain (<= 0: not at all).

    The kernel computes x Ŵᵀ + b with Ŵ = q · scale after rounding x to one per-tensor step
    s = (max(x, 0) - min(x, 0)) / qmax, qmax = 255 (127 with reduce_range): each input moves by at most s
    (half a step from rounding, up to half more from the zero point's nudge to an integer), so output o
    moves by at most s · Σ_i |Ŵ[o, i]|, plus the fp32 rounding of the sums (a few ulps of Σ_i |x_i| |Ŵ[o, i]|).
    """
    w = layer.dequantized_weight().double()
    x = inp.double()
    exact = F.linear(x, w, None if layer.bias is None else layer.bias.double())
    step = float(x.clamp(min=0).max() - x.clamp(max=0).min()) / (127 if reduce_range else 255)
    bound = step * w.abs().sum(1) + 1e-5 * F.linear(x.abs(), w.abs()) + 1e-6
    return float(((out.double() - exact).abs() - bound).max())


def int8_layer_calls(qmodel, x):
    """(name, input, output, layer) of every Int8Linear call during qmodel(x)."""
    calls, hooks = [], []
    for name, m in qmodel.named_modules():
        if isinstance(m, Int8Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: calls.append((name, args[0].detach(), out.detach(), mod))))
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


class TestQuantize(unittest.TestCase):
    def test_every_linear_is_int8_per_output_channel(self):
        for variant in VARIANTS:
            with self.subTest(**variant):
                model = random_model(**variant)
                qmodel = quantize(model)
                self.assertFalse(any(isinstance(m, nn.Linear) for m in qmodel.modules()))
                linears = dict(model.named_modules())
                for name, m in qmodel.named_modules():
                    if isinstance(m, Int8Linear):
                        w = linears[name].weight.detach()
                        self.assertEqual(m.weight.dtype, torch.int8)
                        self.assertTrue(torch.equal(m.scale, w.abs().amax(dim=1) / 127))
                        # round to nearest: every weight within half a step of its int8 value
                        err = (w - m.weight.float() * m.scale[:, None]).abs()
                        self.assertTrue(bool((err <= m.scale[:, None] / 2 * (1 + 1e-5)).all()))
                        self.assertEqual(int(m.weight.abs().max()), 127)
                # the fp32 model is untouched and its time weights are copied as they were
                self.assertIsInstance(model.lm_head, nn.Linear)
                for name, p in model.named_parameters():
                    if "time_" in name:
                        self.assertTrue(torch.equal(qmodel.get_parameter(name), p))

    def test_each_int8_linear_is_its_formula_within_the_activation_step(self):
        # the bound is derived from the quantization (excess_over_rounding), checked on the inputs each layer
        # really sees in the int8 model, for the CPU's own setting and 7-bit activations, which cannot saturate
        # anywhere (8 bits need VNNI's 32-bit sums, where REDUCE_RANGE is False)
        x = held_out()[:, :-1]
        settings = {quantize_module.REDUCE_RANGE, True}
        for kw in ({}, dict(time_weighting="circulant", token_shift=True)):
            qmodel = quantize(trained_model(**kw))
            for reduce_range in sorted(settings):
                with self.subTest(reduce_range=reduce_range, **kw), mock.patch.object(quantize_module, "REDUCE_RANGE",
                                                                                      reduce_range):
                    for name, inp, out, layer in int8_layer_calls(qmodel, x):
                        self.assertLessEqual(excess_over_rounding(layer, inp, out, reduce_range), 0.0, name)
                        # and it is that formula: at most a couple of inputs rounded the other way at a tie
                        # (one input moves output o by step · |Ŵ[o, i]|) on top of fp32 rounding
                        emulated, step = emulated_int8_linear(layer, inp, reduce_range)
                        flip = step * layer.dequantized_weight().double().abs().amax(1)
                        slack = 1e-5 * emulated.abs() + 1e-6
                        self.assertLessEqual(float(((out.double() - emulated).abs() - 2 * flip - slack).max()), 0.0,
                                             name)

    def test_validation_loss_rises_under_one_percent(self):
        batch = held_out()
        model = trained_model()
        with torch.no_grad():
            fp32 = model(batch[:, :-1], batch[:, 1:])[1]
            int8 = quantize(model)(batch[:, :-1], batch[:, 1:])[1]
        self.assertLess(float(int8), float(fp32) * 1.01)

    def test_cached_generation_works_and_matches_uncached(self):
        prompt = held_out(2)[:, :5]
        for variant in VARIANTS:
            with self.subTest(**variant):
                qmodel = quantize(random_model(**variant))
                cached = qmodel.generate(prompt, 20)
                self.assertEqual(tuple(cached.shape), (2, 25))
                self.assertTrue(torch.equal(cached, qmodel.generate(prompt, 20, use_cache=False)))
        # past block_size, generation slides its window
        self.assertEqual(qmodel.generate(prompt, 40).shape[1], 45)

    def test_greedy_tokens_of_trained_model_match_fp32(self):
        model = trained_model()
        prompt = held_out(4)[:, :8]
        same = (model.generate(prompt, 16) == quantize(model).generate(prompt, 16)).float().mean()
        self.assertGreaterEqual(float(same), 0.9)

    def test_fallback_without_int8_kernels_is_the_dequantized_product(self):
        torch.manual_seed(0)
        q = Int8Linear.from_linear(nn.Linear(64, 48))
        x = torch.randn(3, 5, 64, dtype=torch.float64)  # no int8 kernel takes float64: the fallback path
        expected = F.linear(x, (q.weight.double() * q.scale.double()[:, None]).float().double(), q.bias.double())
        self.assertTrue(torch.allclose(q(x), expected, atol=1e-6))
        self.assertLessEqual(excess_over_rounding(q, x.float(), q(x.float()), quantize_module.REDUCE_RANGE), 0.0)

    def test_errors(self):
        model = random_model()
        with self.assertRaisesRegex(TypeError, "mygpt GPT"):
            quantize(nn.Linear(2, 2))
        with self.assertRaisesRegex(ValueError, "quantized already"):
            quantize(quantize(model))
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(TypeError, "quantize"):
                save_quantized(model, os.path.join(tmp, "m.pt"))
            fp32 = os.path.join(tmp, "fp32.pt")
            save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, fp32)
            with self.assertRaisesRegex(CheckpointError, "not a quantized"):
                load_quantized(fp32)


class TestQuantizedCheckpoint(unittest.TestCase):
    def round_trip(self, model):
        qmodel = quantize(model)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "int8.pt")
            save_quantized(qmodel, path, tokenizer={"kind": "chars", "chars": "ab"})
            raw = torch.load(path, weights_only=True)  # plain tensors and values only
            loaded = load_quantized(path)
            size = os.path.getsize(path)
        return qmodel, loaded, raw, size

    def test_round_trip_gives_identical_outputs(self):
        x = held_out(4)[:, :-1]
        for variant in VARIANTS:
            with self.subTest(**variant):
                qmodel, loaded, raw, _ = self.round_trip(random_model(**variant))
                self.assertFalse(loaded.training)
                with torch.no_grad():
                    self.assertTrue(torch.equal(loaded(x)[0], qmodel(x)[0]))
                self.assertTrue(torch.equal(loaded.generate(x[:1, :4], 10), qmodel.generate(x[:1, :4], 10)))
                self.assertEqual(raw["model"]["lm_head.weight"].dtype, torch.int8)
                self.assertEqual(raw["model"]["transformer.h.0.mlp.c_fc.weight"].dtype, torch.int8)
                self.assertEqual(raw["tokenizer"], {"kind": "chars", "chars": "ab"})
                self.assertEqual(raw["model_config"], qmodel.config.to_dict())

    def test_tied_matrix_is_stored_once_and_stays_tied(self):
        _, loaded, raw, _ = self.round_trip(random_model())
        self.assertEqual(raw["model"]["lm_head.weight"].untyped_storage().data_ptr(),
                         raw["model"]["transformer.wte.qweight"].untyped_storage().data_ptr())
        self.assertEqual(loaded.lm_head.weight.data_ptr(), loaded.transformer.wte.qweight.data_ptr())
        self.assertIsInstance(loaded.transformer.wte, Int8Embedding)
        self.assertEqual(loaded.transformer.wte.weight.dtype, torch.float32)  # what the KV cache reads

    def test_untied_model_round_trips(self):
        model = random_model(tie_weights=False)
        qmodel, loaded, raw, _ = self.round_trip(model)
        self.assertFalse(torch.equal(raw["model"]["lm_head.weight"], raw["model"]["transformer.wte.qweight"]))
        x = held_out(2)[:, :-1]
        with torch.no_grad():
            self.assertTrue(torch.equal(loaded(x)[0], qmodel(x)[0]))
        q, s = raw["model"]["transformer.wte.qweight"], raw["model"]["transformer.wte.scale"]
        err = (model.transformer.wte.weight.detach() - q.float() * s[:, None]).abs()
        self.assertTrue(bool((err <= s[:, None] / 2 * (1 + 1e-5)).all()))

    def test_file_is_at_least_3_5x_smaller_than_fp32(self):
        model = random_model(n_embd=128)
        _, _, _, size = self.round_trip(model)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = os.path.join(tmp, "fp32.pt")
            torch.save(model.state_dict(), fp32)
            self.assertGreaterEqual(os.path.getsize(fp32) / size, 3.5)


if __name__ == "__main__":
    unittest.main()
