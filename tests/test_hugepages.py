import copy
import os
import tempfile
import unittest

import torch

from mygpt import GPT
from mygpt.hugepages import HUGE_PAGE, huge_pages_supported, move_to_huge_pages


def _mapping_flags(address):
    """The VmFlags of the mapping of /proc/self/smaps that holds address."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _small_gpt(n_embd=256, vocab_size=3000):
    config = GPT.get_default_config()
    config.merge_from_dict(dict(n_layer=1, n_head=4, n_embd=n_embd, vocab_size=vocab_size, block_size=16))
    torch.manual_seed(0)
    return GPT(config)


@unittest.skipUnless(huge_pages_supported(), "no MADV_HUGEPAGE on this platform")
class TestHugePages(unittest.TestCase):

    def test_large_weights_move_into_advised_aligned_memory_and_small_ones_stay(self):
        model = _small_gpt()  # wte = lm_head: 3000 x 256 x 4 B = 2.9 MiB; the rest below 2 MiB
        large = [p for p in model.parameters() if p.numel() * p.element_size() >= HUGE_PAGE]
        self.assertEqual(len(large), 1)
        self.assertIs(model.lm_head.weight, model.transformer.wte.weight)  # still tied: one tensor moved once
        self.assertEqual(large[0].data_ptr() % HUGE_PAGE, 0)
        self.assertIn("hg", _mapping_flags(large[0].data_ptr()))  # madvise(MADV_HUGEPAGE) took
        c_attn = model.transformer.h[0].attn.c_attn.weight  # 768 x 256 x 4 B = 0.75 MiB: left where it was
        # (not a check of its mapping's flags: another library of the process may have advised that heap memory)
        where = c_attn.data_ptr()
        move_to_huge_pages(model)
        self.assertEqual(c_attn.data_ptr(), where)

    def test_values_parameters_and_training_unchanged(self):
        torch.manual_seed(0)
        layer = torch.nn.Linear(1024, 1024)  # 4 MiB of weight
        before = layer.weight.detach().clone()
        weight, old_ptr = layer.weight, layer.weight.data_ptr()
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
        move_to_huge_pages(layer)
        self.assertIs(layer.weight, weight)  # the same Parameter, so the optimizer still holds it
        self.assertNotEqual(layer.weight.data_ptr(), old_ptr)
        torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
        twin = torch.nn.Linear(1024, 1024)
        twin.load_state_dict({"weight": before, "bias": layer.bias.detach().clone()})
        twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=0.1)
        x = torch.randn(4, 1024)
        for lay, opt in ((layer, optimizer), (twin, twin_optimizer)):
            lay(x).square().sum().backward()
            opt.step()
        torch.testing.assert_close(layer.weight, twin.weight, rtol=0, atol=0)

    def test_a_model_in_huge_pages_computes_what_a_copy_in_ordinary_memory_does(self):
        model = _small_gpt().eval()
        ordinary = copy.deepcopy(model)  # deepcopy clones into ordinary memory
        self.assertNotEqual(ordinary.lm_head.weight.data_ptr() % HUGE_PAGE, 0)
        idx = torch.randint(0, 3000, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model(idx)[0], ordinary(idx)[0], rtol=0, atol=0)
        torch.testing.assert_close(model.generate(idx[:, :4], 8), ordinary.generate(idx[:, :4], 8), rtol=0, atol=0)

    def test_an_int8_model_holds_its_large_tensors_in_huge_pages_after_a_copy_and_a_reload(self):
        from mygpt.quantize import load_quantized, save_quantized
        qmodel = _small_gpt(n_embd=1024, vocab_size=4000).quantize(layers="all")  # a deepcopy of the fp32 model
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(qmodel, os.path.join(tmp, "int8.pt"))
            loaded = load_quantized(os.path.join(tmp, "int8.pt"))
        for model in (qmodel, loaded):
            # the int8 c_fc (4096 x 1024 B = 4 MiB), the tied int8 head and embedding (3.9 MiB), the embedding's
            # dequantized rows (15.6 MiB); c_attn's int8 weights (3 MiB) too
            for t in (model.transformer.h[0].mlp.c_fc.weight, model.lm_head.weight, model.transformer.wte.weight,
                      model.transformer.h[0].attn.c_attn.weight):
                self.assertEqual(t.data_ptr() % HUGE_PAGE, 0)
                self.assertIn("hg", _mapping_flags(t.data_ptr()))


if __name__ == "__main__":
    unittest.main()
