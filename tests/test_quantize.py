import copy
import functools
import os
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import mygpt.quantize as quantize_module
from mygpt.checkpoint import CheckpointError, open_checkpoint, save_checkpoint
from mygpt.model import GPT
from mygpt.quantize import Int8Linear, _Int8Embedding, load_quantized, quantize, save_quantized
from tests.corpus import english_prose
from tests.helpers import VARIANTS, q8, tiny_config



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
        # anywhere (8 bits need VNNI's 32-bit sums, where _REDUCE_RANGE is False)
        x = held_out()[:, :-1]
        settings = {quantize_module._REDUCE_RANGE, True}
        for kw in ({}, dict(time_weighting="circulant", token_shift=True)):
            qmodel = quantize(trained_model(**kw), layers="all")
            for reduce_range in sorted(settings):
                setting = mock.patch.object(quantize_module, "_REDUCE_RANGE", reduce_range)
                with self.subTest(reduce_range=reduce_range, **kw), setting:
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
            int8 = quantize(model, layers="all")(batch[:, :-1], batch[:, 1:])[1]
        self.assertLess(float(int8), float(fp32) * 1.01)

    def test_cached_generation_works_and_matches_uncached(self):
        prompt = held_out(2)[:, :5]
        for variant in VARIANTS:
            with self.subTest(**variant):
                qmodel = quantize(random_model(**variant), layers="all")
                cached = qmodel.generate(prompt, 20)
                self.assertEqual(tuple(cached.shape), (2, 25))
                self.assertTrue(torch.equal(cached, qmodel.generate(prompt, 20, use_cache=False)))
        # past block_size, generation slides its window
        self.assertEqual(qmodel.generate(prompt, 40).shape[1], 45)

    def test_greedy_tokens_of_trained_model_match_fp32(self):
        model = trained_model()
        prompt = held_out(4)[:, :8]
        same = (model.generate(prompt, 16) == quantize(model, layers="all").generate(prompt, 16)).float().mean()
        self.assertGreaterEqual(float(same), 0.9)

    def test_fallback_without_int8_kernels_is_the_dequantized_product(self):
        torch.manual_seed(0)
        q = Int8Linear.from_linear(nn.Linear(64, 48))
        x = torch.randn(3, 5, 64, dtype=torch.float64)  # no int8 kernel takes float64: the fallback path
        expected = F.linear(x, (q.weight.double() * q.scale.double()[:, None]).float().double(), q.bias.double())
        self.assertTrue(torch.allclose(q(x), expected, atol=1e-6))
        self.assertLessEqual(excess_over_rounding(q, x.float(), q(x.float()), quantize_module._REDUCE_RANGE), 0.0)

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
            with self.assertRaisesRegex(ValueError, "layers must be 'auto' .* or 'all' .* got 'int8'"):
                load_quantized(fp32, layers="int8")
            with self.assertRaisesRegex(ValueError, "layers must be 'auto' .* or 'all' .* got 'int8'"):
                open_checkpoint(fp32, int8_layers="int8")  # refused for an fp32 checkpoint too
        with self.assertRaisesRegex(ValueError, "layers must be 'auto' .* or 'all' .* got None"):
            quantize(model, layers=None)


# what the hooks see of each Int8Linear call: the exact result of one kernel or the other
def int8_kernel(layer, x):
    return torch.ops.quantized.linear_dynamic(x, layer.packed(), quantize_module._REDUCE_RANGE)


def fp32_kernel(layer, x):
    return F.linear(x, layer.dequantized_weight(), layer.bias)


class TestKernelChoice(unittest.TestCase):
    """layers="auto": whichever kernel the timing favours, measured in the model once per size class and model
    architecture. The timing is injected (the real one depends on the CPU), and the measurements start empty."""

    SHAPES = {(64, 192), (64, 64), (64, 256), (256, 64), (64, 65)}  # c_attn, attn and mlp c_proj, c_fc, lm_head

    def setUp(self):
        self.timed = []  # (kernel, in_features, rows) of every timed call
        choices = mock.patch.dict(quantize_module._CHOICES, clear=True)
        timing = mock.patch.object(quantize_module, "_timed", self.int8_from_16_rows)
        for patch in (choices, timing):
            patch.start()
            self.addCleanup(patch.stop)

    def int8_from_16_rows(self, kernel, x):
        """A machine where int8 takes 2 ms a call below 16 rows and 1 ms from there, fp32 the other way round."""
        rows = x.numel() // x.shape[-1]
        name = kernel.__name__.split("_")[0]  # int8_product, fp32_product
        self.timed.append((name, x.shape[-1], rows))
        return kernel(x), 1e-3 * (1 + ((name == "int8") == (rows < 16)))

    def check_kernels(self, qmodel, x, kernel):
        """qmodel(x) measures where it has to; then every Linear of another call runs kernel."""
        with torch.no_grad():
            qmodel(x)
        calls = int8_layer_calls(qmodel, x)
        self.assertEqual(len(calls), sum(isinstance(m, Int8Linear) for m in qmodel.modules()))  # each once
        for name, inp, out, layer in calls:
            self.assertTrue(torch.equal(out, kernel(layer, inp)), name)

    def test_each_call_runs_the_kernel_measured_faster_for_its_size(self):
        qmodel = quantize(random_model())
        x = held_out(2)[:, :-1]  # 64 rows
        self.check_kernels(qmodel, x[:1, :1], fp32_kernel)      # decoding: 1 row
        self.check_kernels(qmodel, x, int8_kernel)              # a batch
        self.check_kernels(qmodel, x[:1, :3], fp32_kernel)      # 3 rows: the size class of 4
        # five passes of each kernel per size, each timing one Linear of each shape
        self.assertEqual(len(self.timed), 3 * 2 * 5 * len(self.SHAPES))
        self.assertEqual({(kernel, rows) for kernel, _, rows in self.timed},
                         {(kernel, rows) for kernel in ("int8", "fp32") for rows in (1, 64, 3)})
        # once per size class: 2 and 4 rows are 3's class, 17 to 64 the batch's
        self.timed.clear()
        self.check_kernels(qmodel, x[:2, :2], fp32_kernel)
        self.check_kernels(qmodel, x[:, :9], int8_kernel)
        self.assertEqual(self.timed, [])
        (timings,) = quantize_module._CHOICES.values()
        self.assertEqual(sorted(timings), [(1, torch.get_num_threads()), (4, torch.get_num_threads()),
                                           (64, torch.get_num_threads())])
        self.assertEqual(timings[1, torch.get_num_threads()], {shape: (2e-3, 1e-3) for shape in self.SHAPES})

    def test_the_fp32_kernel_multiplies_one_row_by_the_int8_weights_without_an_fp32_copy(self):
        """One row (decoding) goes to mygpt.matvec over the int8 weights: the dequantized product, exact but for
        fp32's accumulation (n eps_32 sum |w x|, and one rounding of the scale and the bias)."""
        torch.manual_seed(0)
        layer = Int8Linear.from_linear(nn.Linear(512, 1024))  # enough weights for matvec
        x = torch.randn(1, 1, 512)
        with torch.inference_mode():
            y = layer.fp32_product(x)
        self.assertIsNone(layer._fp32)
        w = layer.weight.double() * layer.scale.double()[:, None]
        exact = x.double() @ w.T + layer.bias.double()
        eps = torch.finfo(torch.float32).eps
        bound = 512 * eps * (x.double().abs() @ w.abs().T) + 2 * eps * exact.abs()
        self.assertTrue(bool(((y.double() - exact).abs() <= bound).all()))

    def test_the_int8_kernel_quantizes_one_row_in_blocks_of_32(self):
        """One row: x in int8 blocks of 32, each with its own step (llama.cpp's q8_0; mygpt.matvec, whose sums
        tests/test_matvec.py checks); more rows: fbgemm, one step for the whole input."""
        torch.manual_seed(0)
        layer = Int8Linear.from_linear(nn.Linear(512, 1024))
        x = torch.randn(1, 1, 512)
        x[..., :32] *= 1e-3  # one block of small values, which one step for the whole row would flatten
        with torch.inference_mode():
            y = layer.int8_product(x)
            fbgemm = torch.ops.quantized.linear_dynamic(x, layer.packed(), False)
        q, d = q8(x[0, 0])
        exact = (q * d) @ (layer.weight.double() * layer.scale.double()[:, None]).T + layer.bias.double()
        self.assertTrue(torch.allclose(y[0, 0].double(), exact, atol=1e-5, rtol=1e-5))
        # the first block's share of the product survives here, not in fbgemm's one step
        small = x[0, 0, :32].double() @ (layer.weight.double() * layer.scale.double()[:, None])[:, :32].T
        self.assertLess(float((y[0, 0] - exact).abs().max()), 1e-2 * float(small.abs().max()))
        self.assertFalse(torch.allclose(fbgemm[0, 0].double(), exact, atol=1e-5, rtol=1e-5))

    def test_fp32_weights_are_kept_only_where_the_fp32_kernel_runs(self):
        qmodel = quantize(random_model())
        blocks = [m for m in qmodel.transformer.h.modules() if isinstance(m, Int8Linear)]
        self.check_kernels(qmodel, held_out(2)[:, :-1], int8_kernel)  # measured with both, int8 chosen
        self.assertTrue(all(layer._fp32 is None for layer in blocks))
        self.check_kernels(qmodel, held_out(1)[:, :1], fp32_kernel)
        self.assertTrue(all(layer._fp32 is not None for layer in blocks))
        # a tied head multiplies by the embedding's dequantized matrix, the same numbers, kept once
        self.assertIs(qmodel.lm_head.fp32_weight(), qmodel.transformer.wte.weight)
        self.assertIsNone(qmodel.lm_head._fp32)
        loaded = self.saved_and_loaded(qmodel)
        self.assertIs(loaded.lm_head.fp32_weight(), loaded.transformer.wte.weight)
        self.assertIsNone(quantize(random_model(tie_weights=False)).lm_head.tied_weight)

    @staticmethod
    def saved_and_loaded(qmodel, **kw):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "int8.pt")
            save_quantized(qmodel, path)
            return load_quantized(path, **kw)

    def test_every_model_of_an_architecture_chooses_alike(self):
        model = random_model()
        x = held_out(2)[:, :-1]
        self.check_kernels(self.saved_and_loaded(quantize(model)), x[:1, :1], fp32_kernel)
        self.check_kernels(model.quantize(), x[:1, :1], fp32_kernel)  # measured already
        self.check_kernels(quantize(random_model(seed=1)), x[:1, :1], fp32_kernel)
        self.assertEqual(len(self.timed), 5 * 2 * len(self.SHAPES))
        self.check_kernels(quantize(random_model(n_layer=3)), x[:1, :1], fp32_kernel)  # another architecture
        self.assertEqual(len(self.timed), 2 * 5 * 2 * len(self.SHAPES))
        self.assertEqual(len(quantize_module._CHOICES), 2)

    def test_the_model_is_int8_everywhere_or_fp32_with_the_dequantized_weights(self):
        """Where every shape chose one kernel, auto's logits are those of layers="all" (int8), or those of the
        fp32 GPT whose weights are the dequantized int8 ones (fp32)."""
        x = held_out(2)[:, :-1]
        for tied in (True, False):
            model = random_model(tie_weights=tied)
            qmodel = quantize(model)
            dequantized = copy.deepcopy(model)
            with self.subTest(tied=tied), torch.no_grad():
                for name, m in qmodel.named_modules():
                    if isinstance(m, Int8Linear):
                        dequantized.get_submodule(name).weight.copy_(m.dequantized_weight())
                dequantized.transformer.wte.weight.copy_(qmodel.transformer.wte.weight)
                # 1 row: the fp32 kernel in every Linear (the injected timing); the products may round differently
                self.assertTrue(torch.allclose(qmodel(x[:1, :1])[0], dequantized(x[:1, :1])[0], rtol=1e-5, atol=1e-6))
                # 64 rows: the int8 kernel in every Linear
                self.assertTrue(torch.equal(qmodel(x)[0], quantize(model, layers="all")(x)[0]))

    def test_each_layer_runs_the_kernel_its_recorded_timings_favour(self):
        int8_shapes = {(64, 192), (256, 64)}  # c_attn and the MLP's c_proj; fp32 in the three others

        def timing(kernel, x):
            layer, name = kernel.__self__, kernel.__name__.split("_")[0]  # a bound int8_product or fp32_product
            wins = ((layer.in_features, layer.out_features) in int8_shapes) == (name == "int8")
            return kernel(x), 1e-3 if wins else 2e-3
        qmodel = quantize(random_model())
        x = held_out(2)[:, :-1]
        with mock.patch.object(quantize_module, "_timed", timing):
            for inp in (x[:1, :1], x):
                with torch.no_grad():
                    qmodel(inp)  # measures
                (timings,) = quantize_module._CHOICES.values()
                recorded = timings[quantize_module._size_class(inp.numel()), torch.get_num_threads()]
                self.assertEqual({shape for shape, (int8, fp32) in recorded.items() if int8 < fp32}, int8_shapes)
                for name, layer_input, out, layer in int8_layer_calls(qmodel, inp):
                    int8, fp32 = recorded[layer.in_features, layer.out_features]
                    kernel = int8_kernel if int8 < fp32 else fp32_kernel
                    self.assertTrue(torch.equal(out, kernel(layer, layer_input)), name)

    def test_a_head_of_the_same_shape_as_another_layer_is_measured_once(self):
        qmodel = quantize(random_model(vocab_size=256))  # lm_head 64x256, as c_fc: 4 shapes
        self.check_kernels(qmodel, held_out(1)[:, :1], fp32_kernel)
        self.assertEqual(len(self.timed), 5 * 2 * 4)

    def test_a_saved_model_holds_the_int8_weights_alone(self):
        for tied in (True, False):
            with self.subTest(tied=tied):
                model = random_model(tie_weights=tied)
                qmodel = quantize(model)
                self.check_kernels(qmodel, held_out(1)[:, :1], fp32_kernel)  # fp32 weights made in every Linear
                with tempfile.TemporaryDirectory() as tmp:
                    for m, name in ((qmodel, "auto.pt"), (quantize(model, layers="all"), "all.pt")):
                        save_quantized(m, os.path.join(tmp, name))
                    auto, every = (torch.load(os.path.join(tmp, name), weights_only=True)["model"]
                                   for name in ("auto.pt", "all.pt"))
                    loaded = load_quantized(os.path.join(tmp, "auto.pt"))
                self.assertEqual(list(auto), list(every))
                for key, tensor in auto.items():
                    self.assertEqual(tensor.dtype, every[key].dtype, key)
                    self.assertTrue(torch.equal(tensor, every[key]), key)
                self.assertEqual(auto["lm_head.weight"].dtype, torch.int8)
                # and the loaded model chooses as the saved one did: it is of the same architecture
                self.check_kernels(loaded, held_out(1)[:, :1], fp32_kernel)

    def test_layers_all_runs_int8_everywhere_without_measuring(self):
        model = random_model()
        x = held_out(2)[:, :-1]
        loaded = self.saved_and_loaded(quantize(model), layers="all")
        for qmodel in (quantize(model, layers="all"), model.quantize(layers="all"), loaded):
            self.check_kernels(qmodel, x[:1, :1], int8_kernel)
            self.check_kernels(qmodel, x, int8_kernel)
        self.assertEqual(self.timed, [])
        self.assertIn("int8 kernel", repr(loaded.lm_head))
        self.assertIn("int8 or fp32 kernel, the faster", repr(quantize(model).lm_head))

    def test_a_size_no_forward_of_the_model_had_runs_int8(self):
        qmodel = quantize(random_model())
        x = torch.randn(5, 64)
        self.assertTrue(torch.equal(qmodel.lm_head(x), int8_kernel(qmodel.lm_head, x)))  # not through the model
        self.assertEqual(self.timed, [])

    def test_each_choice_is_logged_once(self):
        qmodel = quantize(random_model())
        x = held_out(1)[:, :1]
        with self.assertLogs("mygpt", "INFO") as logs, torch.no_grad():
            qmodel(x)
        self.assertEqual(len(logs.output), len(self.SHAPES))
        self.assertIn(f"int8 Linear 256x64, up to 1 rows, {torch.get_num_threads()} threads: the fp32 kernel "
                      f"(int8 2000 µs, fp32 1000 µs a call, in the model)", "\\n".join(logs.output))
        with self.assertNoLogs("mygpt", "INFO"), torch.no_grad():
            qmodel(x)

    def test_an_error_while_measuring_leaves_the_model_as_it_was(self):
        qmodel = quantize(random_model())
        with self.assertRaisesRegex(ValueError, "vocab"):
            qmodel(torch.tensor([[65]]))  # outside the vocabulary: the model's own error, from the first pass
        self.assertTrue(all(layer.measuring is None for layer in qmodel.modules() if isinstance(layer, Int8Linear)))
        self.check_kernels(qmodel, held_out(1)[:, :1], fp32_kernel)

    def test_fp32_weights_made_in_inference_mode_serve_calls_that_track_gradients(self):
        qmodel = quantize(random_model())
        prompt = held_out(1)[:, :1]
        qmodel.generate(prompt, 2)  # inference mode, 1 row: the fp32 kernel
        self.assertTrue(qmodel(prompt)[0].requires_grad)  # the LayerNorms' weights

    def test_size_classes_are_powers_of_4(self):
        self.assertEqual([quantize_module._size_class(rows) for rows in (1, 2, 4, 5, 16, 17, 4096, 4097)],
                         [1, 4, 4, 16, 16, 64, 4096, 16384])


class TestMeasure(unittest.TestCase):
    """How long _measure() times: five passes of each kernel at least, until the timed calls took _PROBE_SECONDS
    (20 ms), or one pass each where the first two took ten times as long; the fastest call per shape and kernel.
    Injected timings."""

    def passes(self, seconds):
        """(passes of each kernel, measure's result, the timings given) with every timed call taking
        seconds(calls so far); and the most Linear layers that held fp32 weights at a time."""
        given, held = [], []
        qmodel = quantize(random_model(), layers="all")

        def timing(kernel, x):
            given.append(((x.shape[-1], kernel(x).shape[-1]), kernel.__name__.split("_")[0], seconds(len(given))))
            held.append(sum(m._fp32 is not None for m in qmodel.modules() if isinstance(m, Int8Linear)))
            return kernel(x), given[-1][2]
        with mock.patch.object(quantize_module, "_timed", timing):
            result = quantize_module._measure(qmodel, held_out(1)[:, :4])
        per_pass = len(TestKernelChoice.SHAPES)  # one layer of each shape is timed
        self.assertEqual(len(given) % (2 * per_pass), 0)  # whole passes of both kernels
        # one of each block shape (4 of 8 block layers); the tied head's are the embedding's
        self.assertEqual(max(held), 4)
        self.assertTrue(all(m._fp32 is None for m in qmodel.modules() if isinstance(m, Int8Linear)))  # dropped
        return len(given) // (2 * per_pass), result, given

    def test_five_passes_when_they_take_long_enough(self):
        self.assertEqual(self.passes(lambda n: 1e-3)[0], 5)  # 5 x 10 timed calls: 50 ms
        self.assertEqual(self.passes(lambda n: 0.019)[0], 5)  # the first two: 190 ms

    def test_one_pass_when_it_takes_ten_times_as_long(self):
        self.assertEqual(self.passes(lambda n: 0.021)[0], 1)  # 10 timed calls: 210 ms

    def test_fast_passes_go_on_until_the_time_is_spent(self):
        self.assertEqual(self.passes(lambda n: 3e-4)[0], 7)    # 7 x 10 calls: 21 ms
        self.assertEqual(self.passes(lambda n: 1e-9)[0], 100)

    def test_the_fastest_call_of_each_shape_and_kernel(self):
        _, result, given = self.passes(lambda n: 1e-3 * (1 + (n * 7919) % 13))  # scattered
        fastest = {}
        for shape, kernel, seconds in given:
            fastest[shape, kernel] = min(fastest.get((shape, kernel), 1.0), seconds)
        self.assertEqual(result, {shape: (fastest[shape, "int8"], fastest[shape, "fp32"]) for shape, _ in fastest})
        self.assertEqual(set(result), TestKernelChoice.SHAPES)


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
        self.assertIsInstance(loaded.transformer.wte, _Int8Embedding)
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
