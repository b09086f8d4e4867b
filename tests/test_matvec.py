import unittest

import torch

from mygpt.matvec import MIN_WEIGHTS, matvec, pays

FP32_EPS = torch.finfo(torch.float32).eps


def accumulation_bound(weight, x, scale=None):
    """|y - exact| for an fp32 sum of n products: at most n eps_32 sum |w x| (the classic bound, loose by far),
    each product of a weight converted exactly to fp32 (bf16 and int8 values are fp32 values)."""
    w = weight.double() * (1 if scale is None else scale.double()[:, None])
    return weight.shape[1] * FP32_EPS * (w.abs() @ x.double().abs()) + 1e-30


class TestMatvec(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.x = torch.randn(384)
        self.bias = torch.randn(1000)
        self.weights = {dtype: torch.randn(1000, 384).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
        self.weights[torch.int8] = torch.randint(-127, 128, (1000, 384), dtype=torch.int8)

    def test_each_dtype_is_the_exact_product_within_fp32_accumulation(self):
        scale = torch.rand(1000) / 127
        with torch.inference_mode():
            for dtype, weight in self.weights.items():
                s = scale if dtype == torch.int8 else None
                for bias in (None, self.bias):
                    y = matvec(weight, self.x[None, None], s, bias)  # (1, 1, in) as a decoding step's row
                    self.assertEqual((y.shape, y.dtype), ((1, 1, 1000), torch.float32))
                    w = weight.double() * (1 if s is None else s.double()[:, None])
                    exact = w @ self.x.double() + (0 if bias is None else bias.double())
                    error = (y[0, 0].double() - exact).abs()
                    # and one rounding each for the scale and the bias
                    bound = accumulation_bound(weight, self.x, s) + 2 * FP32_EPS * exact.abs()
                    self.assertTrue(bool((error <= bound).all()), (dtype, bias))

    def test_where_it_pays(self):
        big, small = torch.zeros(MIN_WEIGHTS // 128, 128), torch.zeros(8, 128)
        row, rows = torch.zeros(1, 1, 128), torch.zeros(2, 1, 128)
        with torch.no_grad():
            self.assertTrue(pays(big, row))
            self.assertFalse(pays(big, rows))    # several rows: a matrix product
            self.assertFalse(pays(small, row))   # the call would cost more than it saves
        self.assertFalse(pays(big, row))         # autograd: the library kernels, which have a backward


if __name__ == "__main__":
    unittest.main()
