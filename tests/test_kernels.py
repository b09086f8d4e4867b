"""
The fused time-weighted attention kernel (mygpt/kernels) against the plain formula, on the CPU.

Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is first imported) runs the kernels
on CPU tensors, so forward outputs and the gradients of q, k, v and the time parameters are checked
without a GPU, on small odd shapes that cross tile edges (the interpreter uses 16 x 16 tiles). A
subprocess without the interpreter compiles the kernels for an H100 (sm_90), which catches what the
interpreter lets through, and checks the refusal of CPU tensors there. Everything skips when Triton
is not installed. bfloat16 is left to bench/gpu.py: the interpreter cannot multiply it (see _check).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import json
import math
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

from mygpt.kernels import time_weighted_attention, triton_available
from tests.helpers import process_level

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


def interpreted():
    """Whether the kernels run in Triton's interpreter in this process ('' when they do, else why not)."""
    if not triton_available():
        return "Triton is not installed (pip install 'mygpt[gpu]' or the test extra)"
    from triton.runtime.interpreter import InterpretedFunction
    from mygpt.kernels import time_attention
    if not isinstance(time_attention._forward, InterpretedFunction):
        return "mygpt.kernels.time_attention was imported without TRITON_INTERPRET=1"
    return ""


def circulant(time_weight, time_bias, T):
    """W[h, t, u] = time_weight[h, block_size - 1 - (t - u)] * time_bias[h, 0, u] for u <= t, else 0."""
    block_size = time_weight.shape[1]
    t, u = torch.arange(T)[:, None], torch.arange(T)[None, :]
    W = time_weight[:, (block_size - 1 - (t - u)).clamp(max=block_size - 1)] * time_bias[:, :, :T]
    return W * (u <= t)


def reference(q, k, v, W):
    """softmax(q k^T / sqrt(d) + causal mask) * W @ v, as written, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    att = torch.softmax(scores, dim=-1)
    return (att if W is None else att * W.double()) @ v


def qkv(B, nh, T, hs, dtype=torch.float32):
    """q, k, v (B, nh, T, hs) laid out as the model makes them: views of one (B, T, 3 * nh * hs) projection."""
    x = torch.randn(B, T, 3, nh, hs).to(dtype)
    return [x[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3)]


def time_parameters(form, nh, block_size):
    """The time parameters of a form, drawn around 1 (their initial value), requiring grad."""
    if form == "full":
        return {"time_weighting": 1 + 0.5 * torch.randn(nh, block_size, block_size)}
    if form == "circulant":
        return {"time_weight": 1 + 0.5 * torch.randn(nh, block_size),
                "time_bias": 1 + 0.5 * torch.randn(nh, 1, block_size)}
    return {}


def weights(params, T):
    if "time_weighting" in params:
        return params["time_weighting"][:, :T, :T]
    if "time_weight" in params:
        return circulant(params["time_weight"], params["time_bias"], T)
    return None


@unittest.skipIf(interpreted(), interpreted())
class TestAgainstFormula(unittest.TestCase):

    def check(self, form, T, B=2, nh=3, hs=8, block_size=40, dtype=torch.float32, tol=1e-4):
        torch.manual_seed(T + hs)
        q, k, v = qkv(B, nh, T, hs, dtype)
        params = {name: p.requires_grad_() for name, p in time_parameters(form, nh, block_size).items()}
        dy = torch.randn(q.shape)
        inputs = [q, k, v, *params.values()]
        # The interpreter computes with numpy: no inf or NaN may arise anywhere, not even in the padding rows
        # and columns of a tile that are never stored (a read outside a tensor would show up so).
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y = time_weighted_attention(q, k, v, **params)
            grads = torch.autograd.grad(y, inputs, dy.to(dtype))
        self.assertEqual((y.shape, y.dtype), (q.shape, dtype))
        expected = reference(q, k, v, weights(params, T))
        expected_grads = torch.autograd.grad(expected, inputs, dy.double())
        names = ["y", "q", "k", "v", *params]
        for name, got, want in zip(names, (y, *grads), (expected, *expected_grads)):
            scale = want.abs().max().item()
            self.assertLess((got.double() - want).abs().max().item(), tol * max(1.0, scale), f"{form} T={T} {name}")

    def test_full(self):
        for T in (13, 37):
            self.check("full", T)

    def test_circulant(self):
        for T in (13, 37):
            self.check("circulant", T)

    def test_without_weights_is_causal_attention(self):
        self.check(None, 37)

    def test_head_size_not_a_power_of_two(self):
        self.check("circulant", 21, nh=2, hs=48)

    def test_block_size_equal_to_T(self):
        # the longest distance reaches time_weight[h, 0], and the last row and column of time_weighting
        self.check("circulant", 24, block_size=24)
        self.check("full", 24, block_size=24)

    def test_float16_with_float32_accumulation(self):
        self.check("full", 37, dtype=torch.float16, tol=2e-3)

    def test_compiled_graph_matches_eager(self):
        torch.manual_seed(0)
        q, k, v = qkv(2, 2, 19, 16)
        params = {name: p.requires_grad_() for name, p in time_parameters("circulant", 2, 24).items()}
        inputs = [q, k, v, *params.values()]
        eager = time_weighted_attention(q, k, v, **params)
        eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
        # aot_eager traces forward and backward through the custom ops' fake implementations (shapes and
        # strides), as inductor does, without compiling C++
        compiled_fn = torch.compile(time_weighted_attention, backend="aot_eager", fullgraph=True)
        compiled = compiled_fn(q, k, v, **params)
        self.assertEqual(compiled.stride(), eager.stride())
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        for got, want in zip(torch.autograd.grad(compiled.square().sum(), inputs), eager_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@unittest.skipIf(interpreted(), interpreted())
class TestErrors(unittest.TestCase):

    def test_bad_inputs_say_what_to_fix(self):
        q, k, v = qkv(1, 2, 8, 16)
        with self.assertRaisesRegex(ValueError, "share one shape"):
            time_weighted_attention(q, k[:, :, :4], v)
        with self.assertRaisesRegex(TypeError, "share one dtype"):
            time_weighted_attention(q, k.double(), v)
        with self.assertRaisesRegex(TypeError, "interpreter computes bfloat16"):
            time_weighted_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        with self.assertRaisesRegex(ValueError, "block_size >= T=8"):
            time_weighted_attention(q, k, v, time_weighting=torch.ones(2, 4, 4))
        with self.assertRaisesRegex(ValueError, "both time_weight and time_bias"):
            time_weighted_attention(q, k, v, time_weight=torch.ones(2, 8))
        with self.assertRaisesRegex(ValueError, r"time_weight must have shape \(n_head=2"):
            time_weighted_attention(q, k, v, time_weight=torch.ones(3, 8), time_bias=torch.ones(3, 1, 8))
        with self.assertRaisesRegex(ValueError, "either time_weighting"):
            time_weighted_attention(q, k, v, time_weighting=torch.ones(2, 8, 8), time_weight=torch.ones(2, 8),
                                    time_bias=torch.ones(2, 1, 8))


def gpt(attention, time_weighting, **overrides):
    from mygpt import GPT
    config = GPT.get_default_config()
    config.merge_from_dict(dict(n_layer=2, n_head=2, n_embd=32, vocab_size=11, block_size=24, attention=attention,
                                time_weighting=time_weighting, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    config.merge_from_dict(overrides)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # time weights away from their initial ones, so that they matter
        for name, p in model.named_parameters():
            if "time_" in name:
                p.add_(0.5 * torch.randn(p.shape))
    return model


@unittest.skipIf(interpreted(), interpreted())
class TestInTheModel(unittest.TestCase):

    def test_triton_attention_matches_torch_attention(self):
        idx = torch.randint(0, 11, (2, 19), generator=torch.Generator().manual_seed(0))
        targets = torch.roll(idx, -1, dims=1)
        for form, token_shift in (("full", False), ("circulant", True)):
            results = []
            for attention in ("torch", "triton"):
                model = gpt(attention, form, token_shift=token_shift)
                logits, loss = model(idx, targets)
                loss.backward()
                results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
            (logits, loss, grads), (k_logits, k_loss, k_grads) = results
            torch.testing.assert_close(k_logits, logits, rtol=0, atol=1e-5, msg=form)
            torch.testing.assert_close(k_loss, loss, rtol=0, atol=1e-6, msg=form)
            for name in grads:
                torch.testing.assert_close(k_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=f"{form} {name}")

    def test_modern_switches_through_the_kernel(self):
        # q and k enter the kernel after QK-norm and the rotation, k and v repeated for grouped-query attention
        modern = dict(pos_emb="rope", norm="rmsnorm", embd_norm=True, qk_norm=True, mlp="relu2", n_kv_head=1,
                      bias=False, tie_weights=False, logit_softcap=15.0, token_shift=True)
        idx = torch.randint(0, 11, (2, 19), generator=torch.Generator().manual_seed(0))
        results = []
        for attention in ("torch", "triton"):
            model = gpt(attention, "circulant", **modern)
            logits, loss = model(idx, torch.roll(idx, -1, dims=1))
            loss.backward()
            results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
        (logits, grads), (k_logits, k_grads) = results
        torch.testing.assert_close(k_logits, logits, rtol=0, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(k_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        model = gpt("triton", "circulant", **modern).eval()
        prompt = idx[:, :5]
        self.assertTrue(torch.equal(model.generate(prompt, 8),
                                    gpt("torch", "circulant", **modern).eval().generate(prompt, 8, use_cache=False)))

    def test_cached_generation_with_the_kernel_for_the_prompt(self):
        # the prompt goes through the kernel, each new token through the PyTorch path
        model = gpt("triton", "circulant").eval()
        prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
        cached = model.generate(prompt, max_new_tokens=8, use_cache=True)
        torch.testing.assert_close(cached, gpt("torch", "circulant").eval().generate(prompt, 8, use_cache=False))

    def test_auto_takes_pytorch_on_the_cpu_and_triton_refuses_dropout(self):
        from mygpt.kernels import time_attention
        model = gpt("auto", "full")
        calls = []
        original = time_attention._forward_op
        time_attention._forward_op = lambda *args: calls.append(1) or original(*args)
        try:
            model(torch.zeros(1, 4, dtype=torch.long))
        finally:
            time_attention._forward_op = original
        self.assertEqual(calls, [])
        with self.assertRaisesRegex(ValueError, "attention='triton' has no attention dropout"):
            gpt("triton", "full", attn_pdrop=0.1).train()(torch.zeros(1, 4, dtype=torch.long))
        with self.assertRaisesRegex(ValueError, "unknown attention 'flash'"):
            gpt("flash", None)


@unittest.skipIf(interpreted(), interpreted())
@process_level
class TestGPUBenchmark(unittest.TestCase):

    def test_cpu_smoke_run_of_bench_gpu(self):
        # bench/gpu.py --cpu-smoke runs every check and measurement of the GPU benchmark on tiny shapes
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "smoke.json")
            run = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu.py"), "--cpu-smoke", path],
                                 cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                                 capture_output=True, text=True, timeout=300)
            self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
            with open(path) as f:
                results = json.load(f)
        for kind in ("tests", "attention", "training"):
            for name, out in results[kind].items():
                self.assertTrue(out["ok"], f"{kind}/{name}: {out}")
        self.assertEqual(len(results["tests"]), 6)
        self.assertEqual(len(results["training"]), 6)
        self.assertIn("nanoGPT-style reference", run.stdout)


def compiled_kernel_report():
    """Run without the interpreter: compile every kernel for sm_90 and try CPU tensors; print JSON."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mygpt.kernels import time_attention as ta

    report = {"kernels": []}
    try:
        ta.time_weighted_attention(*qkv(1, 1, 4, 16))
    except RuntimeError as e:
        report["cpu_error"] = str(e)
    pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    for dtype, triton_dtype, hs, forms in ((torch.bfloat16, "bf16", 64, (0, 1, 2)), (torch.float32, "fp32", 128, (2,))):
        for mode in forms:
            for kernel in (ta._forward, ta._backward_dk_dv, ta._backward_dq, ta._backward_dw):
                if kernel is ta._backward_dw and mode == 0:
                    continue  # never launched without time parameters
                BLOCK_M, BLOCK_N, num_warps = ta._tiles(dtype, hs, "cuda", backward=kernel is not ta._forward)
                constants = dict(HEAD=hs, HEAD_PAD=hs, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MODE=mode, PRECISION="tf32")
                if kernel is ta._backward_dw:
                    constants["BLOCK_DIAG"] = triton.next_power_of_2(BLOCK_M + BLOCK_N - 1)
                signature = {name: "constexpr" if name in constants else
                             f"*{triton_dtype}" if name in pointers else
                             "*fp32" if name in ("W1", "W2", "LSE", "DELTA", "DW1", "DW2") else
                             "fp32" if name.endswith("scale") else "i32" for name in kernel.arg_names}
                compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=num_warps, num_stages=2))
                report["kernels"].append([kernel.__name__, triton_dtype, hs, mode, compiled.metadata.shared])
    print(json.dumps(report))


@unittest.skipUnless(triton_available(), "Triton is not installed (pip install 'mygpt[gpu]' or the test extra)")
@process_level
class TestWithoutInterpreter(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
        code = "import tests.test_kernels as t; t.compiled_kernel_report()"
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        if run.returncode != 0:
            raise AssertionError(f"the compile subprocess failed:\n{run.stdout}\n{run.stderr}")
        cls.report = json.loads(run.stdout.strip().splitlines()[-1])

    def test_cpu_tensors_need_the_interpreter(self):
        self.assertIn("set TRITON_INTERPRET=1", self.report.get("cpu_error", "no error"))

    def test_kernels_compile_for_h100_within_its_shared_memory(self):
        self.assertEqual(len(self.report["kernels"]), 11 + 4)
        for name, dtype, hs, mode, shared in self.report["kernels"]:
            self.assertLessEqual(shared, H100_SHARED_MEMORY, f"{name} {dtype} head_size {hs} mode {mode}")


if __name__ == "__main__":
    unittest.main()
