"""Today's switches of mygpt.model (RoPE, RMSNorm, QK-norm, ReLU²/SwiGLU, GQA, logit cap, zero init), each
against a formula written out here, independently of the library's code."""

import itertools
import json
import math
import os
import tempfile
import unittest

import torch

from mygpt.checkpoint import save_checkpoint
from mygpt.model import GPT, KVCache
from mygpt.quantize import quantize
from mygpt.rotary import apply_rotary, rotary_angles
from tests.helpers import tiny_config, tiny_model

MODERN = dict(pos_emb="rope", norm="rmsnorm", embd_norm=True, qk_norm=True, mlp="relu2", bias=False,
              tie_weights=False, zero_init=True, logit_softcap=15.0)


def randomised(model, seed=1):
    """The model with every parameter moved off its initialisation (zeros and ones would hide mistakes)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def complex_rotation(x, positions, base):
    """RoPE as complex numbers: channel j and j + hs/2 are the parts of z_j, multiplied by e^{i t base^(-2j/hs)}."""
    hs = x.shape[-1]
    z = torch.complex(x[..., :hs // 2].double(), x[..., hs // 2:].double())
    theta = torch.tensor([base ** (-2 * j / hs) for j in range(hs // 2)], dtype=torch.float64)
    rotation = torch.polar(torch.ones(len(positions), hs // 2, dtype=torch.float64),
                           torch.tensor(positions, dtype=torch.float64)[:, None] * theta)
    z = z * rotation
    return torch.cat([z.real, z.imag], dim=-1)


def rms_definition(x, eps=1e-6):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def attention_by_definition(attn, x):
    """One attention layer, query by query, key/value heads repeated for grouped-query attention."""
    B, T, C = x.shape
    nh, n_kv, hs = attn.n_head, attn.n_kv_head, C // attn.n_head
    qkv = attn.c_attn(x)
    q = qkv[..., :C].reshape(B, T, nh, hs)
    k = qkv[..., C:C + n_kv * hs].reshape(B, T, n_kv, hs)
    v = qkv[..., C + n_kv * hs:].reshape(B, T, n_kv, hs)
    if attn.qk_norm:
        q, k = rms_definition(q), rms_definition(k)
    if attn.rope_base is not None:
        q = complex_rotation(q.transpose(1, 2), list(range(T)), attn.rope_base).float().transpose(1, 2)
        k = complex_rotation(k.transpose(1, 2), list(range(T)), attn.rope_base).float().transpose(1, 2)
    y = torch.zeros(B, T, nh, hs)
    for h in range(nh):
        g = h // (nh // n_kv)  # the key/value head that query head h shares
        for t in range(T):
            scores = torch.einsum("bd,bud->bu", q[:, t, h], k[:, :t + 1, g]) / math.sqrt(hs)
            y[:, t, h] = torch.einsum("bu,bud->bd", torch.softmax(scores, dim=-1), v[:, :t + 1, g])
    return attn.c_proj(y.reshape(B, T, C))


class TestEachSwitchIsItsFormula(unittest.TestCase):
    def test_rope_is_a_complex_rotation(self):
        torch.manual_seed(0)
        x = torch.randn(2, 3, 7, 8)
        positions = [5, 6, 7, 8, 9, 10, 11]
        for base in (10000.0, 100.0):
            cos, sin = rotary_angles(8, torch.tensor(positions), base)
            got = apply_rotary(x, cos, sin)
            torch.testing.assert_close(got.double(), complex_rotation(x, positions, base), rtol=1e-5, atol=1e-5)
        # what RoPE is for: q·k depends on positions only through their difference
        q, k = torch.randn(8), torch.randn(8)
        def dot(t, u):
            rq = apply_rotary(q.view(1, 1, 1, 8), *rotary_angles(8, torch.tensor([t]), 10000.0))
            rk = apply_rotary(k.view(1, 1, 1, 8), *rotary_angles(8, torch.tensor([u]), 10000.0))
            return (rq * rk).sum().item()
        self.assertAlmostEqual(dot(3, 1), dot(12, 10), places=4)

    def test_rmsnorm_is_its_definition_and_has_no_parameters(self):
        model = tiny_model(norm="rmsnorm", embd_norm=True)
        self.assertFalse(any("ln_" in name for name in model.state_dict()))
        x = torch.randn(3, 5, 32) * 4 + 1
        for norm in (model.transformer.h[0].ln_1, model.transformer.ln_f, model.transformer.ln_e):
            torch.testing.assert_close(norm(x), rms_definition(x))

    def test_attention_with_gqa_qk_norm_and_rope_is_the_definition(self):
        for n_kv, qk_norm, pos_emb in itertools.product((None, 2, 1), (False, True), ("learned", "rope")):
            with self.subTest(n_kv_head=n_kv, qk_norm=qk_norm, pos_emb=pos_emb):
                model = randomised(tiny_model(n_kv_head=n_kv, qk_norm=qk_norm, pos_emb=pos_emb))
                attn = model.transformer.h[0].attn
                kv = n_kv or 4
                self.assertEqual(attn.c_attn.weight.shape, ((4 + 2 * kv) * 8, 32))
                x = torch.randn(2, 9, 32)
                torch.testing.assert_close(attn(x), attention_by_definition(attn, x), rtol=1e-4, atol=1e-5)

    def test_mlps_are_their_formulas(self):
        x = torch.randn(2, 5, 32)
        for kind, hidden in (("gelu", 128), ("relu2", 128), ("swiglu", 88)):  # 8/3 * 32 = 85.3 -> 88
            mlp = randomised(tiny_model(mlp=kind)).transformer.h[0].mlp
            W1, b1, W2, b2 = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias
            self.assertEqual(W2.shape, (32, hidden))
            h = x @ W1.T + b1
            if kind == "gelu":
                a = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
            elif kind == "relu2":
                a = torch.clamp(h, min=0) ** 2
            else:
                gate, value = h[..., :hidden], h[..., hidden:]
                a = gate / (1 + torch.exp(-gate)) * value
            torch.testing.assert_close(mlp(x), a @ W2.T + b2, rtol=1e-5, atol=1e-5)
        self.assertEqual(tiny_model(mlp="swiglu", mlp_hidden=40).transformer.h[0].mlp.c_fc.weight.shape, (80, 32))

    def test_logit_softcap_and_zero_init(self):
        plain = randomised(tiny_model(tie_weights=False))
        capped = tiny_model(tie_weights=False, logit_softcap=2.0)
        capped.load_state_dict(plain.state_dict())
        idx = torch.randint(0, 13, (2, 6))
        expected = 2.0 * torch.tanh(plain(idx)[0] / 2.0)
        torch.testing.assert_close(capped(idx)[0], expected)
        self.assertLessEqual(capped(idx)[0].abs().max().item(), 2.0)

        fresh = tiny_model(zero_init=True, tie_weights=False, bias=False)
        zeroed = [n for n, p in fresh.named_parameters() if not p.any()]
        self.assertEqual(sorted(zeroed), sorted(["lm_head.weight"] + [f"transformer.h.{i}.{m}.c_proj.weight"
                                                                      for i in (0, 1) for m in ("attn", "mlp")]))
        logits, loss = fresh(idx, idx)
        self.assertFalse(logits.any())
        self.assertAlmostEqual(loss.item(), math.log(13), places=5)  # the uniform distribution


class TestComposition(unittest.TestCase):
    def test_cached_equals_uncached_for_every_combination(self):
        others = itertools.cycle([dict(), dict(norm="rmsnorm", embd_norm=True), dict(mlp="relu2", bias=False),
                                  dict(mlp="swiglu", logit_softcap=3.0), dict(**MODERN)])
        for pos_emb, tw, ts, n_kv, qk in itertools.product(("learned", "rope", None), (None, "full", "circulant"),
                                                            (False, True), (None, 2), (False, True)):
            kw = dict(next(others), pos_emb=pos_emb, time_weighting=tw, token_shift=ts, n_kv_head=n_kv, qk_norm=qk)
            with self.subTest(**kw):
                model = randomised(tiny_model(**kw))
                idx = torch.randint(0, 13, (2, 11))
                whole = model(idx)[0]
                cache = KVCache(model.config, 2)
                self.assertEqual(cache.keys[0].shape[1], n_kv or 4)  # the cache holds n_kv_head heads
                steps = [model(idx[:, :4], kv_cache=cache)[0]]
                steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(4, 11)]
                torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)
                uncached = model.generate(idx[:, :3], 12, use_cache=False)  # past block_size too
                self.assertTrue(torch.equal(model.generate(idx[:, :3], 12), uncached))

    def test_gradients_reach_every_parameter_and_match_finite_differences(self):
        for kw in (dict(pos_emb="rope"), dict(norm="rmsnorm", embd_norm=True), dict(qk_norm=True),
                   dict(mlp="relu2"), dict(mlp="swiglu"), dict(n_kv_head=1), dict(logit_softcap=2.0), MODERN,
                   dict(MODERN, time_weighting="circulant", token_shift=True, n_kv_head=2)):
            with self.subTest(**kw):
                model = randomised(tiny_model(**kw)).train()  # randomised: zero_init's zeros would stop gradients
                idx = torch.randint(0, 13, (2, 8))
                model(idx, idx)[1].backward()
                for name, p in model.named_parameters():
                    self.assertTrue(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), name)
                model = model.double()
                attn = model.transformer.h[0].attn
                x = torch.randn(1, 5, 32, dtype=torch.float64, requires_grad=True)
                self.assertTrue(torch.autograd.gradcheck(lambda x: attn(x), (x,)))
                mlp = model.transformer.h[0].mlp
                self.assertTrue(torch.autograd.gradcheck(lambda x: mlp(x), (x,)))

    def test_int8_quantization_keeps_the_switches(self):
        model = randomised(tiny_model(**MODERN, n_kv_head=2))
        q = quantize(model)
        idx = torch.randint(0, 13, (2, 6))
        torch.testing.assert_close(q(idx)[0], model(idx)[0], rtol=0.05, atol=0.15)  # int8: a rough match
        self.assertTrue(torch.equal(q.generate(idx, 12), q.generate(idx, 12, use_cache=False)))


class TestConfigs(unittest.TestCase):
    def test_config_round_trips_through_json_and_checkpoints(self):
        model = randomised(tiny_model(**MODERN, n_kv_head=2, mlp_hidden=48))
        config = GPT.get_default_config()
        config.merge_from_dict(json.loads(model.config.to_json()))
        self.assertEqual(config, model.config)
        rebuilt = GPT(config)
        rebuilt.load_state_dict(model.state_dict())
        idx = torch.randint(0, 13, (1, 7))
        self.assertTrue(torch.equal(rebuilt(idx)[0], model(idx)[0]))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ckpt.pt")
            save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
            loaded = GPT.from_checkpoint(path)
            self.assertTrue(torch.equal(loaded(idx)[0], model(idx)[0]))
            self.assertEqual(loaded.config.pos_emb, "rope")

    def test_old_configs_with_boolean_pos_emb_load(self):
        new_keys = ("rope_base", "norm", "embd_norm", "qk_norm", "mlp", "mlp_hidden", "n_kv_head", "logit_softcap",
                    "zero_init", "preset")
        for old, now in ((True, "learned"), (False, None)):
            model = randomised(tiny_model(pos_emb=now))
            old_config = {k: v for k, v in model.config.to_dict().items() if k not in new_keys}
            old_config["pos_emb"] = old  # as checkpoints written before these switches hold it
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "old.pt")
                save_checkpoint({"model": model.state_dict(), "model_config": old_config}, path)
                loaded = GPT.from_checkpoint(path)
            self.assertEqual(loaded.config.pos_emb, now)
            idx = torch.randint(0, 13, (1, 7))
            self.assertTrue(torch.equal(loaded(idx)[0], model(idx)[0]))
            self.assertEqual(set(loaded.state_dict()), set(model.state_dict()))
        config = tiny_config()
        config.merge_from_args(["--pos_emb=false"])  # an old command line
        self.assertIsNone(GPT(config).config.pos_emb)

    def test_a_checkpoint_with_boolean_pos_emb_resumes(self):
        from tests.trainer_run import CountingData, config
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "old.pt")
            model = GPT(tiny_config(vocab_size=16, block_size=8))
            Trainer(config(max_iters=2, ckpt_path=path), model, CountingData(32)).run()
            ckpt = torch.load(path, weights_only=True)
            ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items()
                                    if k not in ("rope_base", "norm", "embd_norm", "qk_norm", "mlp", "mlp_hidden",
                                                 "n_kv_head", "logit_softcap", "zero_init", "preset")}
            ckpt["model_config"]["pos_emb"] = True  # as written before the switches
            save_checkpoint(ckpt, path)
            trainer = Trainer(config(max_iters=4, ckpt_path=path, resume=True), GPT(tiny_config(vocab_size=16,
                                                                                                  block_size=8)),
                              CountingData(32)).run()
            self.assertEqual(trainer.iter_num, 4)

    def test_defaults_are_gpt2(self):
        c = GPT.get_default_config()
        self.assertEqual((c.pos_emb, c.norm, c.qk_norm, c.mlp, c.n_kv_head, c.logit_softcap, c.zero_init),
                         ("learned", "layernorm", False, "gelu", None, None, False))

    def test_bad_values_name_the_choices_and_bad_pairs_what_to_change(self):
        for kw, message in (
                (dict(norm="batchnorm"), r"unknown norm 'batchnorm'; choose one of \['layernorm', 'rmsnorm'\]"),
                (dict(mlp="geglu"), r"unknown mlp 'geglu'; choose one of \['gelu', 'relu2', 'swiglu'\]"),
                (dict(pos_emb="alibi"), r"unknown pos_emb 'alibi'; choose one of \['learned', 'rope', None\]"),
                (dict(n_kv_head=3), r"n_kv_head \(3\) must divide n_head \(4\).*choose one of \[1, 2, 4\]"),
                (dict(n_kv_head=0), "n_kv_head must be a positive integer"),
                (dict(pos_emb="rope", n_embd=36, n_head=4), "head size n_embd // n_head = 9 is odd"),
                (dict(zero_init=True), "set tie_weights=False"),
                (dict(logit_softcap=-1.0), "logit_softcap must be None"),
                (dict(qk_norm="yes"), "qk_norm must be True or False"),
                (dict(preset="ancient"), r"unknown preset 'ancient'; choose one of \[None, 'modern'\]")):
            with self.subTest(**kw), self.assertRaisesRegex((ValueError, TypeError), message):
                GPT(tiny_config(**kw))


if __name__ == "__main__":
    unittest.main()


# ---------------------------------------------------------------- Muon and the WSD schedule

import subprocess  # noqa: E402
import sys  # noqa: E402

import torch.distributed as dist  # noqa: E402

from mygpt.muon import configure_muon, muon_momentum  # noqa: E402
from mygpt.recipes import _RECIPES, apply_recipe, merge_args  # noqa: E402
from mygpt.trainer import Trainer, _scheduled_lr  # noqa: E402
from mygpt.utils import CfgNode  # noqa: E402
from tests.helpers import TempDirTest, kill_and_resume, process_level, run_script, torchrun  # noqa: E402
from tests.trainer_run import CountingData, TinyLM, TinyMLP, config  # noqa: E402


def newton_schulz(G, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Keller Jordan's quintic iteration, in float64: X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X from X = G / ||G||_F,
    on the wide orientation (rows <= columns)."""
    X = G.double()
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.T


class TestMuon(TempDirTest):
    def test_update_is_nesterov_momentum_through_newton_schulz(self):
        torch.manual_seed(0)
        model = randomised(tiny_model(**MODERN))
        C = Trainer.get_default_config()
        C.merge_from_dict(dict(optimizer="muon", muon_lr=0.02, muon_momentum=0.9, muon_weight_decay=0.1))
        opt = configure_muon(model, C)
        W = model.transformer.h[0].mlp.c_fc.weight  # (128, 32): out/in = 4, the lr is scaled by sqrt(4)
        before, buf = W.detach().clone().double(), torch.zeros(W.shape, dtype=torch.float64)
        lr, mu, wd = 0.02, 0.9, 0.1
        for step in range(3):
            # well-conditioned gradients: NS5 amplifies bf16 rounding in a direction where a gradient is ~0
            # (float64 keeps it ~0), so a real, low-rank gradient would measure bf16 rather than the formula
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            G = W.grad.double()
            opt.step()
            buf = mu * buf + (1 - mu) * G                  # the momentum, an EMA
            U = (1 - mu) * G + mu * buf                    # Nesterov
            expected = -lr * math.sqrt(128 / 32) * newton_schulz(U)
            update = W.detach().double() - before * (1 - lr * wd)
            # torch.optim.Muon iterates in bfloat16: agreement within bf16's precision (~2% of the update)
            self.assertLess(((update - expected).norm() / expected.norm()).item(), 0.04, f"step {step}")
            if step:  # the bound tells formulas apart: without Nesterov the update is 10x further off
                plain = -lr * math.sqrt(128 / 32) * newton_schulz(buf)
                self.assertGreater(((update - plain).norm() / expected.norm()).item(), 0.1)
            before = W.detach().clone().double()
        # orthogonalised: the singular values of NS5's output sit near 1 (between 0.5 and 1.5, by design)
        s = torch.linalg.svdvals(newton_schulz(torch.randn(32, 128)))
        self.assertTrue(((s > 0.5) & (s < 1.5)).all())

    def test_groups_each_parameter_once_with_its_own_lr(self):
        model = tiny_model(**MODERN, time_weighting="circulant", token_shift=True)
        C = Trainer.get_default_config()
        C.merge_from_dict(dict(optimizer="muon", muon_lr=0.05, learning_rate=1e-3))
        opt = configure_muon(model, C)
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
        adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
        self.assertEqual(muon | adamw, set(names.values()))
        self.assertFalse(muon & adamw)
        self.assertTrue(all(n.startswith("transformer.h.") and n.endswith(("c_attn.weight", "c_proj.weight",
                                                                          "c_fc.weight")) for n in muon))
        self.assertEqual(len(muon), 2 * 4)
        self.assertIn("transformer.h.0.attn.time_weight", adamw)  # 2-D, but no hidden matrix
        self.assertTrue({"lm_head.weight", "transformer.wte.weight"} <= adamw)
        self.assertEqual([g["peak_lr"] for g in opt.param_groups], [0.05, 1e-3, 1e-3])
        with self.assertRaisesRegex(ValueError, "needs 2-D hidden weight matrices.*use optimizer='adamw'"):
            Trainer(config(optimizer="muon"), TinyLM(), CountingData(16))
        with self.assertRaisesRegex(ValueError, "use parallel='ddp' with Muon"):
            Trainer(config(optimizer="muon", parallel="fsdp"), TinyMLP(), CountingData(16))
        with self.assertRaisesRegex(ValueError, r"optimizer must be one of \['adamw', 'muon'\], got 'sgd'"):
            Trainer(config(optimizer="sgd"), TinyLM(), CountingData(16))

    def test_wsd_schedule_and_momentum_warmup(self):
        C = config(lr_decay=True, lr_schedule="wsd", learning_rate=1.0, warmup_tokens=100, final_tokens=1100,
                   cooldown_fraction=0.4, cooldown_floor=0.1)
        for tokens, lr in ((0, 0.0), (50, 0.5), (100, 1.0), (400, 1.0), (700, 1.0), (900, 1 - 0.9 * 0.5),
                           (1100, 0.1), (5000, 0.1)):
            self.assertAlmostEqual(_scheduled_lr(C, tokens), lr, places=12, msg=f"tokens {tokens}")
        self.assertAlmostEqual(_scheduled_lr(C, 900, peak=0.02), 0.02 * 0.55, places=12)
        C.muon_momentum_warmup, C.muon_momentum = 300, 0.95
        self.assertEqual([round(muon_momentum(C, s), 6) for s in (0, 150, 300, 1000)], [0.85, 0.9, 0.95, 0.95])
        with self.assertRaisesRegex(ValueError, r"lr_schedule must be one of \['mingpt', 'nanogpt', 'wsd'\]"):
            Trainer(config(lr_schedule="linear"), TinyLM(), CountingData(16))

    def test_trainer_sets_each_group_by_the_schedule_and_loss_falls(self):
        torch.manual_seed(0)
        model = GPT(tiny_config(**MODERN, vocab_size=16, block_size=8))
        C = config(optimizer="muon", lr_schedule="wsd", lr_decay=True, max_iters=40, learning_rate=3e-3)
        trainer = Trainer(C, model, CountingData(256))
        seen = []
        trainer.add_callback("on_batch_end", lambda t: seen.append([g["lr"] for g in t.optimizer.param_groups]
                                                                   + [t.optimizer.muon.param_groups[0]["momentum"]]))
        trainer.run()
        tokens = trainer.history[-1]["tokens"]
        self.assertAlmostEqual(seen[-1][0], _scheduled_lr(trainer.config, tokens, 0.02))
        self.assertAlmostEqual(seen[-1][1], _scheduled_lr(trainer.config, tokens, 3e-3))
        self.assertAlmostEqual(seen[-1][-1], muon_momentum(trainer.config, 39))
        self.assertLess(trainer.history[-1]["loss"], 0.5 * trainer.history[0]["loss"])

    def test_an_adamw_checkpoint_is_not_resumed_by_muon(self):
        Trainer(config(max_iters=2, ckpt_path=self.path("a.pt")), TinyMLP(), CountingData(32)).run()
        with self.assertRaisesRegex(ValueError, "resume it with optimizer='adamw'"):
            Trainer(config(max_iters=4, ckpt_path=self.path("a.pt"), resume=True, optimizer="muon"), TinyMLP(),
                    CountingData(32))

    @process_level
    def test_sigkill_then_resume_is_bit_identical(self):
        iters = 30
        ref, run = kill_and_resume(self, iters, "muon")
        for k, v in ref["model"].items():
            self.assertTrue(torch.equal(v, run["model"][k]), k)
        self.assertEqual(set(ref["optimizer"]), {"muon", "adamw"})  # both optimizers' states are in it
        for part in ("muon", "adamw"):
            for i, state in ref["optimizer"][part]["state"].items():
                for k, v in state.items():
                    self.assertTrue(torch.equal(v, run["optimizer"][part]["state"][i][k]), (part, k))
            self.assertEqual(ref["optimizer"][part]["param_groups"], run["optimizer"][part]["param_groups"])
        self.assertEqual(ref["history"], run["history"])

    @unittest.skipUnless(dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is needed")
    @process_level
    def test_two_processes_match_one(self):
        ddp = torchrun("ddp", self.dir, 8, "muon", timeout=180)
        self.assertEqual(ddp.returncode, 0, ddp.stdout[-2000:] + ddp.stderr[-3000:])
        single = run_script("single", self.dir, 8, "muon")
        self.assertEqual(single.returncode, 0, single.stderr)
        rank0, rank1, alone = (torch.load(self.path(f), weights_only=True)
                               for f in ("ddp0.pt", "ddp1.pt", "single0.pt"))
        for k, v in rank0.items():
            self.assertTrue(torch.equal(v, rank1[k]), k)
            # Muon's bf16 Newton-Schulz turns last-bit differences of the summed gradients into bf16-sized ones
            torch.testing.assert_close(v, alone[k], rtol=1e-2, atol=2e-3)


class TestRecipe(unittest.TestCase):
    def test_preset_applies_first_and_overrides_win(self):
        C = CfgNode(model=GPT.get_default_config(), trainer=Trainer.get_default_config())
        merge_args(C, ["--model.mlp=swiglu", "--model.preset=modern"])
        self.assertEqual(C.model.mlp, "swiglu")  # the explicit override, wherever it stands
        self.assertEqual((C.model.pos_emb, C.model.norm, C.trainer.optimizer, C.trainer.lr_schedule),
                         ("rope", "rmsnorm", "muon", "wsd"))
        self.assertEqual(C.model.preset, "modern")
        with self.assertRaisesRegex(ValueError, r"unknown preset 'postmodern'; choose one of \[None, 'modern'\]"):
            apply_recipe(C, "postmodern")
        self.assertEqual(set(_RECIPES["modern"]), {"model", "trainer"})

    @process_level
    def test_every_project_accepts_the_preset(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for script in ("projects/chargpt/chargpt.py", "projects/adder/adder.py", "projects/image-gpt/imagegpt.py",
                       "projects/gpt2/train.py"):
            with self.subTest(script=script):
                out = subprocess.run([sys.executable, os.path.join(root, script), "--model.preset=modern", "--help"],
                                     capture_output=True, text=True, timeout=120,
                                     env=dict(os.environ, PYTHONPATH=root))
                self.assertEqual(out.returncode, 0, out.stderr[-2000:])
                self.assertIn("--model.pos_emb='rope'", out.stdout)
                self.assertIn("--trainer.optimizer='muon'", out.stdout)


class TestCommandLine(TempDirTest):
    def test_a_modern_checkpoint_works_with_info_sample_eval_quantize_and_export_refuses_it(self):
        from tests.test_cli import CHARS, Windows, run
        from mygpt.tokenizer import load_tokenizer
        ids = load_tokenizer(CHARS).encode("hello hole ") * 30
        C = CfgNode(model=GPT.get_default_config(), trainer=Trainer.get_default_config())
        apply_recipe(C, "modern")
        C.model.merge_from_dict(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=6, block_size=16, n_kv_head=1))
        C.trainer.merge_from_dict(dict(device="cpu", max_iters=20, batch_size=8, learning_rate=1e-2, quiet=True,
                                       log_interval=0, eval_interval=0, ckpt_path=self.path("modern.pt")))
        torch.manual_seed(0)
        Trainer(C.trainer, GPT(C.model), Windows(ids, 16), tokenizer=CHARS).run()
        status, out, err = run("info", self.path("modern.pt"))
        self.assertEqual(status, 0, err)
        self.assertIn("pos_emb: rope", out)
        self.assertIn("preset: modern", out)
        status, out, err = run("sample", self.path("modern.pt"), "--prompt", "he", "--max-new-tokens", 8)
        self.assertEqual(status, 0, err)
        with open(self.path("t.txt"), "w") as f:
            f.write("hello hole " * 10)
        status, out, err = run("eval", self.path("modern.pt"), "--data", self.path("t.txt"))
        self.assertEqual(status, 0, err)
        status, out, err = run("quantize", self.path("modern.pt"), "--out", self.path("q.pt"))
        self.assertEqual(status, 0, err)
        status, out, err = run("sample", self.path("q.pt"), "--prompt", "he", "--max-new-tokens", 8)
        self.assertEqual(status, 0, err)
        status, out, err = run("export", self.path("modern.pt"), "--format", "hf", "--out", self.path("hf"),
                               "--no-tokenizer")
        self.assertEqual(status, 1)  # the modern recipe is Qwen3 with three switches no architecture holds
        self.assertIn("the nearest, Qwen3, cannot represent embd_norm=True", err)
        self.assertIn("mlp='relu2' (Qwen3 has mlp='swiglu')", err)
        self.assertIn("logit_softcap=15.0", err)
