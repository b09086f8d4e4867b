import resource
import unittest

import numpy as np

from mygpt.order import EpochOrder, epoch_batches, micro_batches_in_step


class TestEpochOrder(unittest.TestCase):
    def test_a_permutation_for_every_size(self):
        for n in (1, 2, 3, 7, 64, 1000, 4097):
            with self.subTest(n=n):
                order = EpochOrder(seed=5, epoch=0, n=n)
                self.assertEqual(sorted(order[np.arange(n)].tolist()), list(range(n)))

    def test_a_pure_function_of_seed_epoch_and_tag(self):
        n = 500
        whole = EpochOrder(1, 2, n)[np.arange(n)]
        self.assertTrue(np.array_equal(whole, EpochOrder(1, 2, n)[np.arange(n)]))
        self.assertEqual([EpochOrder(1, 2, n)[i] for i in (0, 17, 499)], whole[[0, 17, 499]].tolist())
        for other in (EpochOrder(2, 2, n), EpochOrder(1, 3, n), EpochOrder(1, 2, n, tag=1)):
            self.assertFalse(np.array_equal(whole, other[np.arange(n)]))

    def test_looks_shuffled(self):
        n = 10000
        order = EpochOrder(0, 0, n)[np.arange(n)]
        self.assertLess(np.mean(order == np.arange(n)), 0.01)  # hardly any fixed points
        # neighbours in the order are not neighbours in the data
        self.assertGreater(np.mean(np.abs(np.diff(order))), n / 5)

    def test_ten_billion_examples_in_constant_memory(self):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        order = EpochOrder(3, 0, 10 ** 10)
        positions = np.arange(10 ** 10 - 100_000, 10 ** 10)
        picked = order[positions]
        self.assertTrue(((picked >= 0) & (picked < 10 ** 10)).all())
        self.assertEqual(len(set(picked.tolist())), len(positions))
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        self.assertLess(grown_mib, 100)

    def test_batches_split_steps_between_processes_and_micro_batches(self):
        order = EpochOrder(7, 0, 100)
        one = list(epoch_batches(order, 0, batch_size=16))  # 6 steps of 16 and a last one of 4
        self.assertEqual([len(b) for b in one], [16] * 6 + [4])
        self.assertEqual(sorted(sum(one, [])), list(range(100)))  # alone: every example exactly once
        # one process with 2 micro-batches of 8 takes what one batch of 16 takes, and the last step only
        # the micro-batches that examples remain for
        accum = list(epoch_batches(order, 0, 8, grad_accum_steps=2))
        self.assertEqual([len(b) for b in accum], [8] * 12 + [4])
        self.assertEqual([a + b for a, b in zip(accum[:12:2], accum[1:12:2])] + [accum[12]], one)
        self.assertEqual([micro_batches_in_step(100, s, 8, 2) for s in range(0, 112, 16)], [2] * 6 + [1])
        ranks = [list(epoch_batches(order, 0, 4, grad_accum_steps=2, world_size=2, rank=r)) for r in (0, 1)]
        self.assertEqual([len(r) for r in ranks], [14, 14])  # with DDP every step is whole ...
        for step in range(7):  # each step: rank 0's and rank 1's micro-batches together are the big batch
            together = ranks[0][2 * step] + ranks[1][2 * step] + ranks[0][2 * step + 1] + ranks[1][2 * step + 1]
            self.assertEqual(together[:len(one[step])], one[step])
        self.assertEqual(together[4:], one[0][:12])  # ... the last one filled up from the start of the order
        seen = [set(sum(r[:12], [])) for r in ranks]  # the 6 steps before the wrap
        self.assertFalse(seen[0] & seen[1])  # disjoint processes
        resumed = list(epoch_batches(order, 48, batch_size=16))  # from a checkpoint at position 48
        self.assertEqual(resumed, one[3:])

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "empty"):
            EpochOrder(0, 0, 0)
        with self.assertRaisesRegex(IndexError, "position 10 is outside"):
            EpochOrder(0, 0, 10)[10]


if __name__ == "__main__":
    unittest.main()
