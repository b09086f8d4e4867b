import os
import platform
import subprocess
import sys
import tempfile
import unittest
import warnings
from unittest import mock

import torch

from mygpt import matvec as matvec_module
from mygpt.matvec import MIN_WEIGHTS, matvec, pays
from tests.helpers import process_level, q8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FP32_EPS = torch.finfo(torch.float32).eps


def accumulation_bound(w, x):
    """|y - exact| for an fp32 sum of n exact products w[o, i] x[i] (w, x as doubles): at most n eps_32 sum |w x|
    (the classic bound, loose by far)."""
    return w.shape[1] * FP32_EPS * (w.abs() @ x.abs()) + 1e-30


class TestMatvec(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def weights(self, out, n):
        return {torch.float32: torch.randn(out, n), torch.bfloat16: torch.randn(out, n).bfloat16(),
                torch.int8: torch.randint(-127, 128, (out, n), dtype=torch.int8)}

    def check(self, weight, x, scale, bias, quantize_x=False):
        y = matvec(weight, x[None, None], scale, bias, quantize_x)  # (1, 1, in) as a decoding step's row
        self.assertEqual((y.shape, y.dtype), ((1, 1, weight.shape[0]), torch.float32))
        w = weight.double()
        if quantize_x:  # the int32 sums of each block are exact, then fp32 sums of (d * block sum)
            xq, d = q8(x)
            exact = w @ (xq * d)
            bound = accumulation_bound(w, xq * d) + 2 * FP32_EPS * (w.abs() @ (xq * d).abs())
        else:  # bf16 weights multiply x rounded to bf16, as autocast's Linear does
            xd = (x.bfloat16() if weight.dtype == torch.bfloat16 else x).double()
            exact, bound = w @ xd, accumulation_bound(w, xd)
        if scale is not None:
            exact, bound = exact * scale.double(), bound * scale.double()
        if bias is not None:
            exact = exact + bias.double()
        bound = bound + 2 * FP32_EPS * exact.abs()  # one rounding each for the scale and the bias
        error = (y[0, 0].double() - exact).abs()
        self.assertTrue(bool((error <= bound).all()), (weight.dtype, quantize_x, float((error - bound).max())))

    def test_each_dtype_is_the_exact_product_within_fp32_accumulation(self):
        # widths that leave every tail of the vector loops (32-, 64-, 128-wide steps) and a short last block
        for n in (384, 100, 3 * 128 + 64 + 32 + 5):
            x, bias, scale = torch.randn(n), torch.randn(1000), torch.rand(1000) / 127
            with torch.inference_mode():
                for dtype, weight in self.weights(1000, n).items():
                    for b in (None, bias):
                        self.check(weight, x, scale if dtype == torch.int8 else None, b)
                        if dtype == torch.int8:
                            self.check(weight, x, scale, b, quantize_x=True)

    def test_x_quantized_in_blocks_keeps_a_block_of_small_values_apart_from_a_large_one(self):
        """A block's step follows its own largest value: a block of small values is not rounded to zero because
        another block holds a large one (one step for the whole row would do that)."""
        x = torch.cat([torch.full((32,), 1e-3), torch.full((32,), 100.0)])
        weight = torch.cat([torch.ones(1, 32), torch.zeros(1, 32)], 1).to(torch.int8).expand(MIN_WEIGHTS // 64, 64)
        y = matvec(weight.contiguous(), x, torch.ones(weight.shape[0]), quantize_x=True)
        self.assertTrue(torch.allclose(y, torch.full_like(y, 32e-3), rtol=1e-6))

    def test_threads_give_the_same_numbers(self):
        """Each row is one thread's sum, in the same order however many threads there are."""
        weight, x = torch.randn(4096, 384), torch.randn(384)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = matvec(weight, x)
            torch.set_num_threads(2)
            self.assertTrue(torch.equal(matvec(weight, x), one))
        finally:
            torch.set_num_threads(threads)

    def test_bad_scales_are_refused(self):
        weight = self.weights(8, 32)
        with self.assertRaisesRegex(ValueError, "int8 weights take a scale"):
            matvec(weight[torch.int8], torch.randn(32))
        with self.assertRaisesRegex(ValueError, "int8 weights take a scale"):
            matvec(weight[torch.float32], torch.randn(32), torch.ones(8))

    def test_where_it_pays(self):
        big, small = torch.zeros(MIN_WEIGHTS // 128, 128), torch.zeros(8, 128)
        row, rows = torch.zeros(1, 1, 128), torch.zeros(2, 1, 128)
        with torch.no_grad():
            self.assertTrue(pays(big, row))
            self.assertFalse(pays(big, rows))    # several rows: a matrix product
            self.assertFalse(pays(small, row))   # the call would cost more than it saves
        self.assertFalse(pays(big, row))         # autograd: the library kernels, which have a backward

    def test_a_kernel_that_cannot_be_built_warns_once_and_hands_back(self):
        """Where building fails (here a source that does not compile) the one call still gets its product, with a
        warning that names the cause, and from then on pays() sends callers to torch's kernels."""
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "matvec.cpp")
            with open(source, "w") as f:
                f.write("this is not C++\n")
            weight, x = torch.randn(MIN_WEIGHTS // 128, 128), torch.randn(128)
            broken = matvec_module.Kernel([source], matvec_module._ARGS, "decoding uses torch's kernels")
            with mock.patch.object(matvec_module, "_KERNEL", broken):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    y = matvec(weight, x)
                    with torch.no_grad():
                        self.assertFalse(pays(weight, x))
                    matvec(weight, x)
                self.assertEqual(len(caught), 1)
                self.assertIn("could not build matvec.cpp", str(caught[0].message))
        self.assertTrue(torch.allclose(y, weight @ x, atol=1e-5))


def _cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


# TestMatvec in a process whose kernel is built for an older x86: the plain loops (vectors off) or AVX2 only
_OLDER = ("import sys, unittest; import torch._inductor.config as c; c.cpp.vec_isa_ok = {vectors}; c.cpp.simdlen = "
          "{simdlen}; r = unittest.main(module=None, argv=['x', 'tests.test_matvec.TestMatvec', 'tests.test_decode.TestStep'], "
          "exit=False).result; "
          "sys.exit(not r.wasSuccessful())")


@unittest.skipUnless(platform.machine().lower() in ("x86_64", "amd64"), "the branches below are x86's")
class TestEveryBranch(unittest.TestCase):
    """matvec.cpp's branches for the instructions a CPU has (and decode.cpp's, which builds them in), each checked on
    this one where it can run them: the tests above and test_decode's in a process built with -march=x86-64 (the
    plain loops) or -march=haswell (AVX2), which the AVX-512 machines that run the suite would otherwise never
    compile."""

    def run_older(self, march, vectors, simdlen):
        env = dict(os.environ, TORCHINDUCTOR_CPP_MARCH=march)
        code = _OLDER.format(vectors=vectors, simdlen=simdlen)
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])

    @process_level
    def test_plain_loops(self):
        self.run_older("x86-64", False, None)

    @process_level
    @unittest.skipUnless(_cpu_has("avx2", "fma"), "this CPU has no AVX2")
    def test_avx2(self):
        self.run_older("haswell", True, 256)


if __name__ == "__main__":
    unittest.main()
