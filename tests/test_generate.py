import unittest

import torch

from mygpt.generate import _filter_logits, stream
from mygpt.model import KVCache
from tests.helpers import VARIANTS, tiny_model


class TestGenerate(unittest.TestCase):
    def test_cached_equals_uncached_in_every_variant(self):
        for variant in VARIANTS:
            with self.subTest(**variant):
                model = tiny_model(**variant)
                prompt = torch.randint(0, 13, (2, 3))
                # 30 new tokens run well past block_size 16, where the window starts to slide
                greedy = model.generate(prompt, 30)
                self.assertTrue(torch.equal(greedy, model.generate(prompt, 30, use_cache=False)))
                runs = []
                for use_cache in (True, False):
                    g = torch.Generator().manual_seed(5)
                    runs.append(model.generate(prompt, 30, do_sample=True, top_k=6, top_p=0.9,
                                               use_cache=use_cache, generator=g))
                self.assertTrue(torch.equal(*runs))

    def test_cached_forward_equals_the_whole_forward(self):
        for variant in VARIANTS:
            with self.subTest(**variant):
                model = tiny_model(**variant)
                idx = torch.randint(0, 13, (2, 16))
                cache = KVCache(model.config, batch_size=2)
                pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 16))]
                self.assertEqual(cache.length, 16)
                torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx)[0], rtol=1e-5, atol=1e-5)
                with self.assertRaisesRegex(ValueError, "after 16 cached positions is longer than block_size"):
                    model(idx[:, :1], kv_cache=cache)

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
        logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
        kept = torch.isfinite(_filter_logits(logits, top_p=0.75))
        self.assertEqual(kept.tolist(), [[True, True, False, False]])
        kept = torch.isfinite(_filter_logits(logits, top_p=0.85))
        self.assertEqual(kept.tolist(), [[True, True, True, False]])


    def test_stream_yields_what_generate_returns(self):
        model = tiny_model(time_weighting="circulant")
        prompt = torch.randint(0, 13, (2, 3))
        pieces = list(stream(model, prompt, 20, do_sample=True, generator=torch.Generator().manual_seed(1)))
        self.assertTrue(all(p.shape == (2, 1) for p in pieces))
        expected = model.generate(prompt, 20, do_sample=True, generator=torch.Generator().manual_seed(1))
        self.assertTrue(torch.equal(torch.cat([prompt] + pieces, dim=1), expected))

    def test_stop_tokens_end_each_row(self):
        model = tiny_model()
        prompt = torch.randint(0, 13, (3, 2))
        free = model.generate(prompt, 12, do_sample=True, generator=torch.Generator().manual_seed(2))
        stop = int(free[0, 4])  # row 0 produces it at its third new token
        out = model.generate(prompt, 12, do_sample=True, generator=torch.Generator().manual_seed(2), stop_tokens=[stop])
        for row in range(3):
            new = free[row, 2:].tolist()
            end = new.index(stop) + 1 if stop in new else len(new)
            self.assertEqual(out[row, 2:2 + end].tolist(), new[:end])  # identical up to the stop token
            self.assertTrue((out[row, 2 + end:] == stop).all())        # then the stop token repeated
        ends = [free[r, 2:].tolist().index(stop) + 1 if stop in free[r, 2:].tolist() else 12 for r in range(3)]
        self.assertEqual(out.shape[1], 2 + max(ends))  # ended when every row had stopped

    def test_bad_sampling_arguments(self):
        model = tiny_model()
        prompt = torch.zeros(1, 2, dtype=torch.long)
        for kwargs, message in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(top_k=0), "top_k"),
                                (dict(top_p=1.5, do_sample=True), "top_p"),
                                (dict(temperature=0, do_sample=True), "temperature"),
                                (dict(stop_tokens=["a"]), "stop_tokens")):
            with self.subTest(**kwargs):
                args = dict(max_new_tokens=3)
                args.update(kwargs)
                with self.assertRaisesRegex((ValueError, TypeError), message):
                    model.generate(prompt, **args)
        with self.assertRaisesRegex(ValueError, "shape"):
            model.generate(torch.zeros(4, dtype=torch.long), 3)


if __name__ == "__main__":
    unittest.main()
