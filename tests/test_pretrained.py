import tempfile
import unittest

import torch

from mygpt import GPT


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
        cls.ours = GPT.from_pretrained(cls.tmp.name)

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
        for name, p in self.ours.named_parameters():  # the tied lm_head/wte matrix once, as in GPT-2
            expected = hf_grads[name].grad
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                expected = expected.t()
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=name)

    def test_comes_back_tied_and_in_eval_mode(self):
        self.assertFalse(self.ours.training)
        self.assertTrue(self.ours.config.tie_weights)
        self.assertIs(self.ours.lm_head.weight, self.ours.transformer.wte.weight)
        self.assertEqual(self.ours.num_parameters(), sum(p.numel() for p in self.hf.parameters()))

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
