import unittest

import numpy as np
import torch

from mygpt.utils import CfgNode, set_seed


class TestCfgNode(unittest.TestCase):
    def make(self):
        return CfgNode(model=CfgNode(n_layer=3, model_type="gpt-mini", time_weighting=None),
                       trainer=CfgNode(batch_size=64, betas=(0.9, 0.95)))

    def test_merge_from_args_parses_literals(self):
        c = self.make()
        c.merge_from_args(["--model.n_layer=4", "--model.model_type=gpt-nano",
                           "--model.time_weighting='full'", "--trainer.betas=(0.9,0.99)"])
        self.assertEqual(c.model.n_layer, 4)
        self.assertEqual(c.model.model_type, "gpt-nano")
        self.assertEqual(c.model.time_weighting, "full")
        self.assertEqual(c.trainer.betas, (0.9, 0.99))

    def test_unknown_key_is_named(self):
        c = self.make()
        with self.assertRaisesRegex(KeyError, "model.n_layers"):
            c.merge_from_args(["--model.n_layers=4"])
        with self.assertRaisesRegex(KeyError, "optim"):
            c.merge_from_args(["--optim.lr=1"])
        with self.assertRaisesRegex(KeyError, "batchsize"):
            c.merge_from_dict({"trainer": {"batchsize": 1}})
        with self.assertRaises(ValueError):
            c.merge_from_args(["model.n_layer=4"])

    def test_merge_from_dict_and_to_dict_round_trip(self):
        c = self.make()
        d = c.to_dict()
        d["model"]["n_layer"] = 7
        c.merge_from_dict(d)
        self.assertEqual(c.model.n_layer, 7)
        self.assertEqual(c.to_dict(), d)
        self.assertIn("n_layer: 7", str(c))


class TestSetSeed(unittest.TestCase):
    def test_repeatable(self):
        set_seed(3)
        a = (torch.rand(3), np.random.rand(2))
        set_seed(3)
        b = (torch.rand(3), np.random.rand(2))
        self.assertTrue(torch.equal(a[0], b[0]))
        self.assertTrue(np.array_equal(a[1], b[1]))


if __name__ == "__main__":
    unittest.main()
