import math
import tempfile
import unittest

import torch
import torch.nn.functional as F

from mygpt.model import GPT, circulant_time_weighting
from mygpt.utils import CfgNode

VARIANTS = [dict(time_weighting=tw, token_shift=ts, pos_emb=pe)
            for tw in (None, "full", "circulant") for ts in (False, True) for pe in (True, False)]


def tiny_config(**kw):
    c = GPT.get_default_config()
    c.model_type = None
    c.n_layer, c.n_head, c.n_embd = 2, 4, 32
    c.vocab_size, c.block_size = 13, 16
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = 0.0
    c.merge_from_dict(kw)
    return c


def tiny_model(seed=0, random_time_weights=True, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw)).eval()
    if random_time_weights:  # ones would hide indexing mistakes
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "time_" in name:
                    p.uniform_(0.2, 1.8)
    return model


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
            model = tiny_model(**variant)
            idx = torch.randint(0, 13, (2, 12))
            changed = idx.clone()
            changed[:, 7] = (changed[:, 7] + 1) % 13
            a, b = model(idx)[0], model(changed)[0]
            self.assertTrue(torch.equal(a[:, :7], b[:, :7]), variant)
            self.assertFalse(torch.allclose(a[:, 7:], b[:, 7:]), variant)

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
        self.assertTrue(all(n.endswith(".weight") and ("c_" in n or "lm_head" in n) for n in decayed))
        undecayed = {names[id(p)] for p in no_decay["params"]}
        self.assertIn("transformer.h.0.attn.time_weight", undecayed)
        self.assertIn("transformer.wte.weight", undecayed)
        self.assertIn("transformer.h.1.ln_2.weight", undecayed)

    def test_bf16_autocast_close_to_fp32(self):
        model = tiny_model(time_weighting="full")
        idx = torch.randint(0, 13, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)[0].float()
        torch.testing.assert_close(low, model(idx)[0], rtol=0.05, atol=0.05)


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
        with self.assertRaisesRegex(ValueError, "top_p"):
            model.generate(torch.zeros(1, 2, dtype=torch.long), 3, do_sample=True, top_p=1.5)
        with self.assertRaisesRegex(ValueError, "temperature"):
            model.generate(torch.zeros(1, 2, dtype=torch.long), 3, do_sample=True, temperature=0)

    def test_config_errors(self):
        with self.assertRaisesRegex(ValueError, "divisible by n_head"):
            GPT(tiny_config(n_embd=30))
        with self.assertRaisesRegex(ValueError, "unknown time_weighting 'diagonal'"):
            GPT(tiny_config(time_weighting="diagonal"))
        with self.assertRaisesRegex(ValueError, "unknown model_type 'gpt5'"):
            GPT(tiny_config(model_type="gpt5", n_layer=None, n_head=None, n_embd=None))
        with self.assertRaisesRegex(ValueError, "either model_type"):
            GPT(tiny_config(model_type="gpt-nano"))
        with self.assertRaisesRegex(ValueError, "vocab_size"):
            GPT(tiny_config(vocab_size=None))


class TestGenerate(unittest.TestCase):
    def test_cached_equals_uncached_in_every_variant(self):
        for variant in VARIANTS:
            model = tiny_model(**variant)
            prompt = torch.randint(0, 13, (2, 3))
            # 30 new tokens run well past block_size 16, where the window starts to slide
            greedy = model.generate(prompt, 30)
            self.assertTrue(torch.equal(greedy, model.generate(prompt, 30, use_cache=False)), variant)
            runs = []
            for use_cache in (True, False):
                g = torch.Generator().manual_seed(5)
                runs.append(model.generate(prompt, 30, do_sample=True, top_k=6, top_p=0.9,
                                           use_cache=use_cache, generator=g))
            self.assertTrue(torch.equal(*runs), variant)

    def test_prompt_is_kept_and_mode_restored(self):
        model = tiny_model().train()
        prompt = torch.randint(0, 13, (1, 20))  # longer than block_size: the window is used
        out = model.generate(prompt, 5)
        self.assertEqual(out.shape, (1, 25))
        self.assertTrue(torch.equal(out[:, :20], prompt))
        self.assertTrue(model.training)
        self.assertFalse(out.is_inference())  # generated tokens can be trained on
        model(out[:, -16:], out[:, -16:])[1].backward()

    def test_top_k_one_is_greedy(self):
        model = tiny_model()
        prompt = torch.randint(0, 13, (2, 4))
        sampled = model.generate(prompt, 10, do_sample=True, top_k=1, temperature=3.0)
        self.assertTrue(torch.equal(sampled, model.generate(prompt, 10)))

    def test_top_p_keeps_smallest_nucleus(self):
        from mygpt.generate import filter_logits
        logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
        kept = torch.isfinite(filter_logits(logits, top_p=0.75))
        self.assertEqual(kept.tolist(), [[True, True, False, False]])
        kept = torch.isfinite(filter_logits(logits, top_p=0.85))
        self.assertEqual(kept.tolist(), [[True, True, True, False]])


class TestFromPretrained(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            import transformers
        except ImportError:
            raise unittest.SkipTest("transformers is not installed (pip install 'mygpt[test]')")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        torch.manual_seed(0)
        hf_config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        cls.hf = transformers.GPT2LMHeadModel(hf_config).eval()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.hf.save_pretrained(cls.tmp.name)
        cls.ours = GPT.from_pretrained(cls.tmp.name).eval()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_logits_and_loss_match_transformers(self):
        idx = torch.randint(0, 50, (2, 32))
        hf_out = self.hf(idx, labels=idx)
        logits, loss = self.ours(idx[:, :-1], idx[:, 1:])
        torch.testing.assert_close(self.ours(idx)[0], hf_out.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(loss, hf_out.loss, rtol=0, atol=1e-5)

    def test_gradients_match_transformers(self):
        idx = torch.randint(0, 50, (2, 16))
        self.hf.zero_grad()
        self.ours.zero_grad()
        self.hf(idx, labels=idx).loss.backward()
        self.ours(idx[:, :-1], idx[:, 1:])[1].backward()
        hf_grads = dict(self.hf.named_parameters())
        for name, p in self.ours.named_parameters():
            if name == "lm_head.weight":  # tied in GPT-2: its gradient lands on wte there
                continue
            expected = hf_grads[name].grad
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                expected = expected.t()
            if name == "transformer.wte.weight":
                expected = expected - self.ours.lm_head.weight.grad
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=name)

    def test_greedy_tokens_match_transformers_generate(self):
        prompt = torch.randint(0, 50, (1, 5))
        hf_tokens = self.hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                     attention_mask=torch.ones_like(prompt))
        self.assertTrue(torch.equal(self.ours.generate(prompt, 20), hf_tokens))

    def test_missing_transformers_directory_is_explained(self):
        with self.assertRaisesRegex(OSError, "save_pretrained"):
            GPT.from_pretrained(self.tmp.name + "-does-not-exist")


if __name__ == "__main__":
    unittest.main()
