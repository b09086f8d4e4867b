import itertools
import math
import os
import tempfile
import unittest

import torch
import torch.nn.functional as F

from mygpt.model import GPT, _MODEL_SHAPES, circulant_time_weighting
from mygpt.utils import CfgNode
from tests.helpers import process_level, tiny_config, tiny_model, VARIANTS


def seed_circulant(time_weight, time_bias, T):
    """The seed document's construction, verbatim in its steps: pad, tile, reshape, slice."""
    TT = time_weight.shape[1]
    ww = F.pad(time_weight, (0, TT))
    ww = torch.tile(ww, [TT])
    ww = ww[:, :-TT].reshape(-1, TT, 2 * TT - 1)
    ww = ww[:, :, TT - 1:]
    ww = ww[:, :T, :T]
    return ww * time_bias[:, :, :T]


class TestTimeWeighting(unittest.TestCase):
    def test_circulant_equals_seed_construction(self):
        torch.manual_seed(0)
        w, b = torch.randn(3, 10), torch.randn(3, 1, 10)
        for T in (1, 4, 10):
            expected = seed_circulant(w, b, T)
            self.assertTrue(torch.equal(circulant_time_weighting(w, b, T), expected))
            last_row = circulant_time_weighting(w, b, T, first_row=T - 1)
            self.assertTrue(torch.equal(last_row, expected[:, T - 1:]))

    def test_attention_matches_plain_formula(self):
        for tw in ("full", "circulant"):
            model = tiny_model(time_weighting=tw)
            attn = model.transformer.h[0].attn
            T = 9
            x = torch.randn(2, T, 32)
            q, k, v = (t.view(2, T, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
            if tw == "full":
                W = attn.time_weighting[:, :T, :T]
            else:
                W = seed_circulant(attn.time_weight, attn.time_bias, T)
            expected = torch.zeros(2, 4, T, 8)
            for t in range(T):  # one query at a time: softmax over keys 0..t, times the weights, then @ v
                scores = q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-2, -1) / math.sqrt(8)
                probs = torch.softmax(scores, dim=-1) * W[:, t:t + 1, :t + 1]
                expected[:, :, t:t + 1] = probs @ v[:, :, :t + 1]
            expected = attn.c_proj(expected.transpose(1, 2).reshape(2, T, 32))
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)

    def test_attention_dropout_matches_plain_formula(self):
        for tw in (None, "full"):
            model = tiny_model(time_weighting=tw, attn_pdrop=0.3).train()
            attn = model.transformer.h[0].attn
            T = 7
            x = torch.randn(2, T, 32)
            q, k, v = (t.view(2, T, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            probs = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~causal, float("-inf")), -1)
            if tw == "full":
                probs = probs * attn.time_weighting[:, :T, :T]
            torch.manual_seed(11)
            expected = F.dropout(probs, 0.3) @ v
            expected = attn.c_proj(expected.transpose(1, 2).reshape(2, T, 32))
            torch.manual_seed(11)
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)

    def test_ones_initialised_time_weighting_equals_vanilla(self):
        vanilla = tiny_model(seed=1)
        idx = torch.randint(0, 13, (3, 16))
        for tw in ("full", "circulant"):
            model = tiny_model(seed=1, random_time_weights=False, time_weighting=tw)
            missing, unexpected = model.load_state_dict(vanilla.state_dict(), strict=False)
            self.assertTrue(missing and all("time_" in k for k in missing))
            self.assertEqual(unexpected, [])
            torch.testing.assert_close(model(idx)[0], vanilla(idx)[0], rtol=1e-5, atol=1e-5)

    def test_time_weights_get_gradients(self):
        for tw, names in (("full", ["time_weighting"]), ("circulant", ["time_weight", "time_bias"])):
            model = tiny_model(time_weighting=tw)
            idx = torch.randint(0, 13, (2, 8))
            model(idx, idx)[1].backward()
            attn = model.transformer.h[0].attn
            for name in names:
                grad = getattr(attn, name).grad
                self.assertGreater(grad.abs().sum().item(), 0.0)
            if tw == "full":  # only the used corner, on and below the diagonal, can matter
                self.assertEqual(attn.time_weighting.grad[:, 8:].abs().sum().item(), 0.0)
                self.assertEqual(attn.time_weighting.grad[:, :8, :8].triu(1).abs().sum().item(), 0.0)


class TestModel(unittest.TestCase):
    def test_causality_in_every_variant(self):
        for variant in VARIANTS:
            with self.subTest(**variant):
                model = tiny_model(**variant)
                idx = torch.randint(0, 13, (2, 12))
                changed = idx.clone()
                changed[:, 7] = (changed[:, 7] + 1) % 13
                a, b = model(idx)[0], model(changed)[0]
                self.assertTrue(torch.equal(a[:, :7], b[:, :7]))
                self.assertFalse(torch.allclose(a[:, 7:], b[:, 7:]))

    def test_loss_ignores_minus_one_targets(self):
        model = tiny_model()
        idx = torch.randint(0, 13, (2, 10))
        targets = torch.randint(0, 13, (2, 10))
        targets[:, :4] = -1
        logits, loss = model(idx, targets)
        expected = F.cross_entropy(logits[:, 4:].reshape(-1, 13), targets[:, 4:].reshape(-1))
        torch.testing.assert_close(loss, expected)

    def test_model_types_and_parameter_names(self):
        c = GPT.get_default_config()
        c.model_type, c.vocab_size, c.block_size = "gpt-nano", 10, 8
        model = GPT(c)
        self.assertEqual((model.config.n_layer, model.config.n_head, model.config.n_embd), (3, 3, 48))
        names = set(model.state_dict())
        for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.2.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                     "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                     "transformer.ln_f.bias", "lm_head.weight"):
            self.assertIn(name, names)
        self.assertNotIn("lm_head.bias", names)
        no_pos = tiny_model(pos_emb=False, bias=False)
        self.assertFalse(any("wpe" in k or k.endswith("bias") for k in no_pos.state_dict()))

    def test_residual_projections_start_smaller(self):
        torch.manual_seed(0)
        c = tiny_config(n_layer=8, n_embd=256, n_head=4)
        model = GPT(c)
        std = model.transformer.h[0].mlp.c_proj.weight.std().item()
        self.assertAlmostEqual(std, 0.02 / math.sqrt(16), delta=0.0005)
        self.assertAlmostEqual(model.transformer.h[0].mlp.c_fc.weight.std().item(), 0.02, delta=0.001)

    def test_configure_optimizers_groups(self):
        model = tiny_model(time_weighting="circulant", token_shift=True)
        opt = model.configure_optimizers(CfgNode(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95)))
        decay, no_decay = opt.param_groups
        self.assertEqual(decay["weight_decay"], 0.1)
        self.assertEqual(no_decay["weight_decay"], 0.0)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        self.assertEqual(sorted(ids), sorted(id(p) for p in model.parameters()))
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        self.assertTrue(all(n.endswith(".weight") and "c_" in n for n in decayed - {"transformer.wte.weight"}))
        self.assertIn("transformer.wte.weight", decayed)  # tied: it is also the head, a Linear layer
        undecayed = {names[id(p)] for p in no_decay["params"]}
        self.assertIn("transformer.h.0.attn.time_weight", undecayed)
        self.assertIn("transformer.h.1.ln_2.weight", undecayed)
        untied = tiny_model(tie_weights=False, time_weighting="circulant", token_shift=True).configure_optimizers(CfgNode(learning_rate=1e-3, weight_decay=0.1,
                                                                            betas=(0.9, 0.95)))
        self.assertEqual(len(untied.param_groups[0]["params"]), len(decay["params"]))  # lm_head for the tie
        self.assertEqual(len(untied.param_groups[1]["params"]), len(no_decay["params"]) + 1)  # + wte

    def test_bf16_autocast_close_to_fp32(self):
        model = tiny_model(time_weighting="full")
        idx = torch.randint(0, 13, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)[0].float()
        torch.testing.assert_close(low, model(idx)[0], rtol=0.05, atol=0.05)


class TestBf16OnCpu(unittest.TestCase):
    """The bf16 paths that replace slow CPU kernels (CausalSelfAttention.attend, _gelu) and leave fp32 alone."""

    def grads(self, dtype, flash_up_to=None):
        """Loss and gradients of one training pass of a vanilla tiny model (autocast to dtype, or fp32), and how
        many times PyTorch's fused attention ran in it."""
        from unittest import mock
        import mygpt.model as model_module
        model = tiny_model().train()
        idx = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(0))
        limit = model_module._CPU_BF16_PLAIN_MAX_T if flash_up_to is None else flash_up_to
        with mock.patch.object(model_module, "_CPU_BF16_PLAIN_MAX_T", limit), \
                mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa, \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(idx, idx)[1]
        loss.backward()
        return loss.float(), [p.grad for p in model.parameters()], sdpa.call_count

    def test_bf16_training_attention_takes_the_plain_path_close_to_flash(self):
        loss, grads, fused_calls = self.grads(torch.bfloat16)
        self.assertEqual(fused_calls, 0)
        flash_loss, flash_grads, flash_calls = self.grads(torch.bfloat16, flash_up_to=0)
        self.assertEqual(flash_calls, 2)  # one per layer
        torch.testing.assert_close(loss, flash_loss, rtol=0.01, atol=0.01)
        for g, f in zip(grads, flash_grads):
            torch.testing.assert_close(g, f, rtol=0.05, atol=0.05 * f.abs().max().item())
        self.assertEqual(self.grads(None)[2], 2)  # fp32 keeps flash attention

    def test_decoding_in_bf16_autocast_attends_in_fp32(self):
        """One query (a decoding step) in bf16 autocast: fp32 attention, the fp32 result exactly; several
        queries (a prompt) stay as autocast runs them (bf16)."""
        attn = tiny_model().eval().transformer.h[0].attn
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, t, 8, generator=g) for t in (1, 9, 9))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            one = attn.attend(q, k, v, None)
            several = attn.attend(k, k, v, None)
        self.assertEqual((one.dtype, several.dtype), (torch.float32, torch.bfloat16))
        self.assertTrue(torch.equal(one, F.scaled_dot_product_attention(q, k, v)))

    def test_gelu_is_exact_in_bf16_on_the_cpu_and_tanh_in_fp32(self):
        from mygpt.model import _gelu
        x = torch.linspace(-8, 8, 100001)
        gap = (F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max().item()
        self.assertLess(gap, 4.8e-4)  # the docstring's bound on what bf16 changes
        self.assertTrue(torch.equal(_gelu(x), F.gelu(x, approximate="tanh")))
        self.assertTrue(torch.equal(_gelu(x.bfloat16()), F.gelu(x.bfloat16())))


class TestLinear(unittest.TestCase):
    def test_inference_path_equals_f_linear_and_training_keeps_autograd(self):
        from mygpt.model import Linear
        torch.manual_seed(0)
        # 48 -> 40 stays in F.linear (a small weight); 512 -> 320 is large enough for oneDNN where PyTorch has it, on x86
        for (fan_in, fan_out), bias in itertools.product(((48, 40), (512, 320)), (True, False)):
            layer = Linear(fan_in, fan_out, bias=bias)
            for x in (torch.randn(1, 1, fan_in), torch.randn(3, 7, fan_in), torch.randn(2, 5, 2 * fan_in)[:, :, ::2]):
                expected = F.linear(x, layer.weight, layer.bias)
                with torch.inference_mode():
                    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
            y = layer(torch.randn(2, 3, fan_in))
            self.assertTrue(y.requires_grad)
            y.sum().backward()
            self.assertEqual(layer.weight.grad.shape, (fan_out, fan_in))


    def test_bf16_autocast_multiplies_by_the_weights_rounded_to_bf16_once(self):
        """The bf16 path against the exact product (float64) of its operands rounded to bf16: with u = 2^-8,
        bf16's unit roundoff, one row (x kept in fp32) is within u sum |w x| of the fp32 product, several rows
        (x rounded too, the output rounded to bf16 as autocast's) within (2u + u^2) sum |w x| + u |y|."""
        import mygpt.model as model_module
        from mygpt.model import Linear, bf16_weight_copies
        u = 2.0 ** -8
        torch.manual_seed(0)
        layer = Linear(512, 1024)  # 2 MiB of weights: the bf16 copy and, for one row, mygpt.matvec
        for x in (torch.randn(1, 1, 512), torch.randn(3, 5, 512)):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), bf16_weight_copies():
                y = layer(x)
                copy = model_module._BF16[layer][0]
            exact = x.double() @ layer.weight.double().T + layer.bias.double()
            magnitude = x.double().abs() @ layer.weight.double().abs().T
            one_row = x.shape[0] * x.shape[1] == 1
            bound = u * magnitude if one_row else (2 * u + u * u) * magnitude + u * exact.abs()
            accumulation = 512 * torch.finfo(torch.float32).eps * magnitude  # fp32 sums of 512 products
            self.assertTrue(bool(((y.double() - exact).abs() <= bound + accumulation).all()))
            self.assertFalse(bool((y.double() == exact).all()))  # it did round
            torch.testing.assert_close(copy, layer.weight.detach().bfloat16(), rtol=0, atol=0)
        self.assertIsNone(model_module._BF16)  # dropped at the exit
        x = torch.randn(1, 512)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with bf16_weight_copies():
                layer(x)
                copy = model_module._BF16[layer][0]
                with bf16_weight_copies():  # nested: the outer one's copies
                    layer(x)
                    self.assertIs(model_module._BF16[layer][0], copy)
                self.assertIs(model_module._BF16[layer][0], copy)
            # outside it, plain autocast: the weights cast at every call, as training's evaluations need
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
        self.assertEqual(set(layer.state_dict()), {"weight", "bias"})


class TestBadInput(unittest.TestCase):
    def test_errors_name_the_problem(self):
        model = tiny_model()
        with self.assertRaisesRegex(ValueError, "longer than block_size 16"):
            model(torch.zeros(1, 17, dtype=torch.long))
        with self.assertRaisesRegex(ValueError, "token id 13 is outside"):
            model(torch.tensor([[1, 13]]))
        with self.assertRaisesRegex(ValueError, "token id -2 is outside"):
            model(torch.tensor([[-2, 1]]))
        with self.assertRaisesRegex(TypeError, "integer token ids"):
            model(torch.zeros(1, 4))
        with self.assertRaisesRegex(TypeError, "torch.Tensor"):
            model([[1, 2]])
        with self.assertRaisesRegex(ValueError, "shape"):
            model(torch.zeros(4, dtype=torch.long))

    def test_config_errors(self):
        with self.assertRaisesRegex(ValueError, "divisible by n_head"):
            GPT(tiny_config(n_embd=30))
        with self.assertRaisesRegex(ValueError, "unknown time_weighting 'diagonal'"):
            GPT(tiny_config(time_weighting="diagonal"))
        with self.assertRaisesRegex(ValueError, "unknown model_type 'gpt5'"):
            GPT(tiny_config(model_type="gpt5", n_layer=None, n_head=None, n_embd=None))
        with self.assertRaisesRegex(ValueError, "'gpt-nano' has n_layer=3, but n_layer=1 was given"):
            GPT(tiny_config(model_type="gpt-nano", n_layer=1, n_head=None, n_embd=None))
        with self.assertRaisesRegex(ValueError, "give the model's shape"):
            GPT(tiny_config(n_head=None))
        with self.assertRaisesRegex(ValueError, "vocab_size"):
            GPT(tiny_config(vocab_size=None))
        with self.assertRaisesRegex(ValueError, "block_size must be a positive integer"):
            GPT(tiny_config(block_size=0))
        with self.assertRaisesRegex(ValueError, r"attn_pdrop .* \[0, 1\), got 1.0"):
            GPT(tiny_config(attn_pdrop=1.0))
        with self.assertRaisesRegex(ValueError, "resid_pdrop"):
            GPT(tiny_config(resid_pdrop=-0.1))
        with self.assertRaisesRegex(ValueError, r"unknown pos_emb 'absolute'; choose one of \['learned', 'rope', None\]"):
            GPT(tiny_config(pos_emb="absolute"))
        with self.assertRaisesRegex(ValueError, "n_layer must be a positive integer, got 2.5"):
            GPT(tiny_config(n_layer=2.5))

    def test_targets_are_checked(self):
        model = tiny_model()
        idx = torch.randint(0, 13, (2, 6))
        with self.assertRaisesRegex(ValueError, r"targets must be a tensor of shape \(2, 6\).*\(2, 5\)"):
            model(idx, idx[:, 1:])
        with self.assertRaisesRegex(TypeError, "targets must hold integer"):
            model(idx, idx.float())
        with self.assertRaisesRegex(ValueError, r"target 13 is outside the vocabulary \[0, 13\)"):
            model(idx, torch.full_like(idx, 13))
        with self.assertRaisesRegex(ValueError, "target -2 is outside"):
            model(idx, torch.full_like(idx, -2))


class TestConfigRoundTrip(unittest.TestCase):
    @process_level
    def test_every_preset_and_custom_shape_rebuilds(self):
        shapes = [dict(model_type=name) for name in _MODEL_SHAPES if name not in ("gpt2-large", "gpt2-xl")]
        shapes += [dict(n_layer=2, n_head=2, n_embd=8, bias=False, tie_weights=False, time_weighting="full",
                        token_shift=True, pos_emb=False)]
        for shape in shapes:
            with self.subTest(**shape):
                c = GPT.get_default_config()
                c.vocab_size, c.block_size = 11, 8
                c.merge_from_dict(shape)
                torch.manual_seed(0)
                model = GPT(c)
                torch.manual_seed(0)
                again = GPT(model.config)
                self.assertEqual(again.config, model.config)
                self.assertEqual(again.state_dict().keys(), model.state_dict().keys())
                for k, v in model.state_dict().items():
                    self.assertTrue(torch.equal(v, again.state_dict()[k]), k)

    def test_numpy_integers_are_taken_as_ints(self):
        import numpy as np
        model = GPT(tiny_config(n_layer=np.int64(2), vocab_size=np.int32(13), block_size=np.int64(16)))
        self.assertEqual([type(model.config.n_layer), type(model.config.vocab_size)], [int, int])
        out = model.generate(torch.zeros(1, 1, dtype=torch.long), np.int64(3), do_sample=True, top_k=np.int64(2))
        self.assertEqual(out.shape, (1, 4))

    def test_from_checkpoint_rebuilds_the_trainers_model(self):
        from mygpt import Trainer
        from mygpt.checkpoint import CheckpointError
        model = tiny_model(time_weighting="circulant", token_shift=True)
        with tempfile.TemporaryDirectory() as d:
            C = Trainer.get_default_config()
            C.device, C.max_iters, C.batch_size, C.quiet, C.ckpt_path = "cpu", 2, 4, True, os.path.join(d, "c.pt")
            data = [(torch.randint(0, 13, (16,)), torch.randint(0, 13, (16,))) for _ in range(8)]
            Trainer(C, model, data).run()
            loaded = GPT.from_checkpoint(C.ckpt_path)
            self.assertFalse(loaded.training)
            self.assertEqual(loaded.config, model.config)
            idx = torch.randint(0, 13, (2, 16))
            torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)
            self.assertEqual(GPT.from_checkpoint(C.ckpt_path, attn_pdrop=0.2).config.attn_pdrop, 0.2)
            torch.save({"model": {}}, os.path.join(d, "bare.pt"))
            with self.assertRaisesRegex(ValueError, "records no model config"):
                GPT.from_checkpoint(os.path.join(d, "bare.pt"))
            with self.assertRaisesRegex(FileNotFoundError, "no checkpoint at"):
                GPT.from_checkpoint(os.path.join(d, "missing.pt"))
            with open(os.path.join(d, "junk.pt"), "wb") as f:
                f.write(b"not a checkpoint")
            with self.assertRaisesRegex(CheckpointError, "damaged or not a torch checkpoint"):
                GPT.from_checkpoint(os.path.join(d, "junk.pt"))


class TestWeightTying(unittest.TestCase):
    def test_tied_head_is_the_embedding(self):
        tied, untied = tiny_model(), tiny_model(tie_weights=False)
        self.assertIs(tied.lm_head.weight, tied.transformer.wte.weight)
        self.assertIsNot(untied.lm_head.weight, untied.transformer.wte.weight)
        self.assertEqual(untied.num_parameters() - tied.num_parameters(), 13 * 32)
        # the tied matrix gets one gradient: the head's and the lookup's together
        untied.load_state_dict(tied.state_dict())
        idx = torch.randint(0, 13, (2, 8))
        tied(idx, idx)[1].backward()
        untied(idx, idx)[1].backward()
        torch.testing.assert_close(tied.lm_head.weight.grad,
                                   untied.lm_head.weight.grad + untied.transformer.wte.weight.grad)

    def test_tie_survives_save_and_load(self):
        model = tiny_model()
        state = model.state_dict()
        again = tiny_model(seed=3)
        again.load_state_dict(state)
        self.assertIs(again.lm_head.weight, again.transformer.wte.weight)
        self.assertTrue(torch.equal(again.lm_head.weight, model.lm_head.weight))


if __name__ == "__main__":
    unittest.main()
