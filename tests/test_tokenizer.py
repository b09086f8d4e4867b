import hashlib
import io
import json
import os
import tempfile
import unittest

import numpy as np
import torch

from mygpt.bpe import Encoder, get_encoder
from mygpt.bpe_train import train_bpe
from mygpt.checkpoint import load_checkpoint, save_checkpoint
from mygpt.data import TokenDataset
from mygpt.model import GPT
from mygpt.prepare import prepare_corpus
from mygpt.tokenizer import (BPETokenizer, describe_tokenizer, load_tokenizer, record_tokenizer, same_tokenizer,
                             text_tokenizer)
from mygpt.trainer import Trainer
from tests.helpers import TempDirTest

TEXT = "Hello world, héllo wörld! 你好 <|endoftext|> the end\n"


def through_checkpoint(description):
    """The description after torch.save and a weights_only torch.load, as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save({"tokenizer": description}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["tokenizer"]


class TestGPT2(unittest.TestCase):
    def test_described_by_name_and_matches_tiktoken(self):
        try:
            from tests.test_bpe import tiktoken_gpt2  # GPT-2's tiktoken encoding, built offline
        except ImportError:
            self.skipTest("tiktoken is not installed (pip install -e '.[test]')")
        reference = tiktoken_gpt2()
        for given in ("gpt2", get_encoder(), BPETokenizer(), Encoder(get_encoder().encoder, get_encoder().merges)):
            self.assertEqual(describe_tokenizer(given), {"type": "gpt2"})
        tok = load_tokenizer(through_checkpoint(describe_tokenizer("gpt2")))
        ids = tok.encode(TEXT)
        self.assertEqual(ids, reference.encode(TEXT, allowed_special="all"))
        self.assertEqual(tok.decode(ids), TEXT)
        self.assertEqual(tok.decode_bytes(ids), TEXT.encode("utf-8"))
        self.assertEqual((tok.vocab_size, tok.eot_token), (reference.n_vocab, reference.eot_token))


class TestTrainedBPE(unittest.TestCase):
    def setUp(self):
        self.encoder = train_bpe(["the cat sat on the mat. " * 20, "héllo wörld " * 10], 300)

    def test_round_trip_through_a_checkpoint_encodes_as_the_encoder(self):
        description = through_checkpoint(describe_tokenizer(self.encoder))
        self.assertEqual(description["type"], "bpe")
        tok = load_tokenizer(description)
        text = "the cat héllo <|endoftext|> mat"
        self.assertEqual(tok.encode(text), self.encoder.encode(text, allowed_special="all"))
        self.assertEqual(tok.decode(tok.encode(text)), text)
        self.assertEqual(tok.vocab_size, self.encoder.vocab_size)
        self.assertEqual(tok.eot_token, self.encoder.special_tokens["<|endoftext|>"])
        self.assertEqual(describe_tokenizer(tok), description)

    def test_description_holds_what_encoder_save_writes(self):
        with tempfile.TemporaryDirectory() as folder:
            self.encoder.save(folder)
            with open(os.path.join(folder, "encoder.json"), encoding="utf-8") as f:
                encoder_json = json.load(f)
            with open(os.path.join(folder, "vocab.bpe"), encoding="utf-8") as f:
                merges = [line.split() for line in f.read().splitlines()[1:]]
        description = describe_tokenizer(self.encoder)
        self.assertEqual(description["encoder"], encoder_json)
        self.assertEqual(description["merges"], merges)

    def test_without_endoftext_has_no_eot(self):
        self.assertIsNone(load_tokenizer(describe_tokenizer(train_bpe("abc abd", 258, special_tokens=()))).eot_token)

    def test_damaged_vocabulary_is_refused(self):
        description = describe_tokenizer(self.encoder)
        description["encoder"]["a"] = description["encoder"]["b"]
        with self.assertRaisesRegex(ValueError, "type 'bpe': "):
            load_tokenizer(description)
        with self.assertRaisesRegex(ValueError, "lacks 'merges'"):
            load_tokenizer({"type": "bpe", "encoder": {}})


class TestIdsOutsideTheVocabulary(unittest.TestCase):
    """Every tokenizer refuses an id outside 0..vocab_size-1, naming it, its position and the range."""

    def test_refused_by_every_tokenizer(self):
        for tok in (load_tokenizer({"type": "gpt2"}), load_tokenizer({"type": "chars", "chars": ["a", "b"], "eot": 2})):
            top = tok.vocab_size - 1
            for bad in (-1, -100000, tok.vocab_size, 10 ** 20):
                torch_bad = max(min(bad, 2 ** 63 - 1), -2 ** 63)  # a tensor holds 64-bit ids at most
                for ids in ([1, bad], np.array([1, bad]), torch.tensor([1, torch_bad])):
                    pattern = f"ids\\[1\\] = {int(ids[1])} is .*\\(ids 0..{top}\\)"
                    for decode in (tok.decode, tok.decode_bytes):
                        with self.subTest(tok=tok.name, bad=bad, ids=type(ids).__name__, decode=decode.__name__), \
                                self.assertRaisesRegex(ValueError, pattern):
                            decode(ids)


class TestChars(unittest.TestCase):
    def test_ids_are_positions_in_the_list(self):
        chars = sorted(set("hello, world\n"))
        tok = load_tokenizer(through_checkpoint(describe_tokenizer(chars)))
        self.assertEqual(tok.encode("hello"), [chars.index(c) for c in "hello"])
        self.assertEqual(tok.decode(tok.encode("hello, world\n")), "hello, world\n")
        self.assertEqual((tok.vocab_size, tok.eot_token), (len(chars), None))

    def test_unknown_characters_are_named(self):
        tok = load_tokenizer(describe_tokenizer(list("abc")))
        with self.assertRaises(ValueError) as caught:
            tok.encode("abXcY")
        self.assertIn("'X', 'Y'", str(caught.exception))
        with self.assertRaisesRegex(ValueError, "outside the character vocabulary"):
            tok.decode([0, 3])

    def test_eot_after_the_characters(self):
        tok = load_tokenizer({"type": "chars", "chars": ["a", "é"], "eot": 2})
        self.assertEqual((tok.vocab_size, tok.eot_token), (3, 2))
        self.assertEqual(tok.decode([1, 2, 0]), "é<|endoftext|>a")
        self.assertEqual(tok.decode_bytes([1]), "é".encode("utf-8"))
        self.assertEqual(describe_tokenizer(tok), {"type": "chars", "chars": ["a", "é"], "eot": 2})

    def test_bad_descriptions(self):
        cases = [
            ({"type": "chars", "chars": "abc"}, "non-empty list"),
            ({"type": "chars", "chars": []}, "non-empty list"),
            ({"type": "chars", "chars": ["a", "bc"]}, r"chars\[1\] = 'bc' is not one character"),
            ({"type": "chars", "chars": ["a", "b", "a"]}, r"'a' appears twice \(chars\[0\] and chars\[2\]\)"),
            ({"type": "chars", "chars": ["a"], "eot": 5}, "'eot' must be len"),
            ({"type": "chars", "chars": ["a"], "extra": 1}, r"unknown keys \['extra'\]"),
            ({"type": "sentencepiece"}, "unknown type 'sentencepiece'"),
            (None, "no tokenizer recorded"),
        ]
        for description, message in cases:
            with self.subTest(description=description), self.assertRaisesRegex(ValueError, message):
                load_tokenizer(description)
        with self.assertRaisesRegex(TypeError, "must be a dict"):
            load_tokenizer(["a"])
        with self.assertRaisesRegex(TypeError, "list of characters"):
            describe_tokenizer("abc")
        with self.assertRaisesRegex(TypeError, "type int"):
            describe_tokenizer(3)


class TestOneRecord(TempDirTest):
    def test_prepare_and_the_trainer_write_the_same_record(self):
        with open(self.path("a.txt"), "w", encoding="utf-8") as f:
            f.write("abcab cab\nba " * 20)
        meta = prepare_corpus(self.path("a.txt"), self.path("corpus"), tokenizer=list("\n abc"), num_workers=1,
                              progress=False)
        record = meta["settings"]["tokenizer"]
        self.assertEqual(record, {"type": "chars", "chars": list("\n abc"), "eot": 5})
        data = TokenDataset(os.path.join(self.path("corpus"), "train_*.bin"), 8)
        mc = GPT.get_default_config()
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, data.vocab_size, 8
        tc = Trainer.get_default_config()
        tc.device, tc.quiet, tc.log_interval, tc.max_iters, tc.batch_size, tc.overwrite = "cpu", True, 0, 1, 2, True
        tc.ckpt_path = self.path("ckpt.pt")
        for given in (data.tokenizer, load_tokenizer(data.tokenizer)):  # the record, or the tokenizer it rebuilds
            with self.subTest(given=type(given).__name__):
                Trainer(tc, GPT(mc), data, tokenizer=given).save_checkpoint(tc.ckpt_path)
                self.assertEqual(load_checkpoint(tc.ckpt_path)["tokenizer"], record)

    def test_the_trainer_records(self):
        palette = {"type": "palette", "colours": [[0.5, 0.5, 0.5]]}  # a project's own record: kept as it is
        for given, recorded in ((None, None), ("gpt2", {"type": "gpt2"}), (get_encoder(), {"type": "gpt2"}),
                                (list("ab"), {"type": "chars", "chars": ["a", "b"]}), (palette, palette)):
            with self.subTest(given=given if isinstance(given, (str, list, dict)) else type(given).__name__):
                self.assertEqual(through_checkpoint(record_tokenizer(given)), recorded)


class TestOlderRecords(unittest.TestCase):
    """Records as older mygpt wrote them still load: a checkpoint's (the Trainer's, of the same form since
    checkpoints first recorded a tokenizer) and a meta.json's (a name and the sha256 of the vocabulary; whole
    corpora are in tests/test_data.py)."""

    GPT2_FILES = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                  "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}

    def test_a_checkpoint_as_an_older_trainer_wrote_it(self):
        encoder = train_bpe(["the cat sat on the mat. " * 20], 280)
        bpe = {"type": "bpe", "encoder": dict(encoder.encoder), "merges": [list(m) for m in encoder.merges],
               "pattern": encoder.pattern}
        for record, text, ids in (
                ({"type": "chars", "chars": ["\n", " ", "a", "b"]}, "ab a\n", [2, 3, 1, 2, 0]),
                ({"type": "chars", "chars": ["a", "b"], "eot": 2}, "ba", [1, 0]),
                ({"type": "gpt2"}, "Hello world<|endoftext|>", [15496, 995, 50256]),
                (bpe, "the mat<|endoftext|>", encoder.encode("the mat<|endoftext|>", allowed_special="all"))):
            with self.subTest(record["type"]), tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "old.pt")
                save_checkpoint({"model": {"w": torch.zeros(1)}, "model_config": {"vocab_size": 50257},
                                 "tokenizer": record}, path)
                tok = text_tokenizer(load_checkpoint(path), path)
                self.assertEqual(tok.encode(text), ids)
                self.assertEqual(tok.decode(ids), text)
                self.assertEqual(record_tokenizer(tok), record)  # a run resumed from it records the same

    def test_a_meta_json_record_as_an_older_prepare_wrote_it(self):
        gpt2 = load_tokenizer({"name": "gpt2", "sha256": self.GPT2_FILES})
        self.assertEqual((gpt2.description, gpt2.encode("Hello world")), ({"type": "gpt2"}, [15496, 995]))
        chars = load_tokenizer({"name": "chars", "chars": "\n ab", "sha256": "(not checked)"})
        self.assertEqual(chars.description, {"type": "chars", "chars": ["\n", " ", "a", "b"], "eot": 4})
        self.assertEqual(chars.encode_ordinary("ba a\n"), [3, 2, 1, 2, 0])
        encoder, other = (train_bpe([text * 20], 280) for text in ("the cat sat on the mat. ", "a dog ran in fog. "))
        with tempfile.TemporaryDirectory() as folder:
            encoder.save(folder)
            hashes = {}
            for name in ("encoder.json", "vocab.bpe"):
                with open(os.path.join(folder, name), "rb") as f:
                    hashes[name] = hashlib.sha256(f.read()).hexdigest()
        bpe = {"name": "bpe", "sha256": hashes}
        with self.assertRaisesRegex(ValueError, "sha256 of a trained BPE vocabulary but not the vocabulary"):
            load_tokenizer(bpe)
        size = encoder.vocab_size
        self.assertTrue(same_tokenizer(bpe, encoder, size))
        self.assertTrue(same_tokenizer(describe_tokenizer(encoder), bpe))
        self.assertFalse(same_tokenizer(bpe, other, size))
        self.assertFalse(same_tokenizer(bpe, encoder, size + 1))


if __name__ == "__main__":
    unittest.main()
