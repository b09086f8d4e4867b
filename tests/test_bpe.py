"""The GPT-2 encoder gives exactly tiktoken's GPT-2 ids, round-trips any text and ships its vocabulary intact."""

import os
import pickle
import shutil
import tempfile
import unittest
from pathlib import Path

import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from mygpt.bpe import DATA_DIR, ENDOFTEXT, GPT2_PATTERN, GPT2_SHA256, BPETokenizer, get_encoder, load_verified
from mygpt.download import sha256_file
from tests.corpus import mixed_text

# The CI clone has shared/ beside the checkout; an environment variable can point elsewhere.
SHARED_GPT2 = Path(os.environ.get("MYGPT_SHARED_GPT2", Path(__file__).resolve().parents[2] / "shared/data/gpt2"))
TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Any text at all, minus lone surrogates, which are not encodable as UTF-8.
ANY_TEXT = st.text(st.characters(codec="utf-8"))
# Code points unknown to this Python's Unicode tables are left out where ids are compared with tiktoken: its regex
# engine has newer tables and may call them letters where the `regex` module does not (or the reverse).
KNOWN_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cn",)))


def tiktoken_ranks():
    """GPT-2's ranks for tiktoken, read offline: from gpt2.tiktoken in shared/, else from the package's own files,
    so the comparison always runs."""
    path = SHARED_GPT2 / "gpt2.tiktoken"
    if path.is_file():
        return load_tiktoken_bpe(str(path), expected_hash=TIKTOKEN_SHA256)
    return data_gym_to_mergeable_bpe_ranks(str(DATA_DIR / "gpt2/vocab.bpe"), str(DATA_DIR / "gpt2/encoder.json"),
                                           GPT2_SHA256["vocab.bpe"], GPT2_SHA256["encoder.json"])


def tiktoken_gpt2():
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=tiktoken_ranks(),
                             special_tokens={ENDOFTEXT: 50256})


class TestSameIdsAsTiktoken(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.enc = get_encoder()
        cls.tk = tiktoken_gpt2()

    def assertSameIds(self, text, **kwargs):
        ours = self.enc.encode(text, **kwargs)
        theirs = self.tk.encode(text, **{"disallowed_special": (), **kwargs})
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            near = self.tk.decode(theirs[max(0, at - 5):at + 5])
            self.fail(f"ids differ at position {at}, near {near!r}: "
                      f"ours {ours[at:at + 5]}, tiktoken {theirs[at:at + 5]}")

    def test_megabyte_of_varied_text(self):
        text = mixed_text(1_100_000)
        self.assertGreater(len(text.encode("utf-8")), 1_000_000)
        self.assertSameIds(text)

    def test_decode_matches_tiktoken_including_broken_utf8(self):
        ids = self.tk.encode("naïve café 日本語 👨‍👩‍👧 ok")
        for start in range(len(ids)):
            self.assertEqual(self.enc.decode(ids[start:]), self.tk.decode(ids[start:]))
        self.assertIn("\ufffd", self.enc.decode(ids[-8:]))

    def test_endoftext_is_ordinary_text_by_default(self):
        text = f"one{ENDOFTEXT}two"
        self.assertSameIds(text)
        self.assertNotIn(50256, self.enc.encode(text))

    def test_endoftext_allowed_maps_to_50256(self):
        text = f"{ENDOFTEXT}a story{ENDOFTEXT}{ENDOFTEXT} the end<|endoftext"
        for allowed in ({ENDOFTEXT}, "all"):
            self.assertSameIds(text, allowed_special=allowed)
            self.assertEqual(self.enc.encode(text, allowed_special=allowed).count(50256), 3)
        self.assertEqual(self.enc.decode([50256]), ENDOFTEXT)

    @settings(max_examples=300, deadline=None)
    @given(KNOWN_TEXT)
    def test_any_text(self, text):
        self.assertSameIds(text)

    def test_shipped_files_equal_the_tiktoken_ranks(self):
        shipped = data_gym_to_mergeable_bpe_ranks(str(DATA_DIR / "gpt2/vocab.bpe"), str(DATA_DIR / "gpt2/encoder.json"),
                                                  GPT2_SHA256["vocab.bpe"], GPT2_SHA256["encoder.json"])
        self.assertEqual(shipped, tiktoken_ranks())


class TestRoundTrip(unittest.TestCase):
    enc = get_encoder()

    @settings(max_examples=300, deadline=None)
    @given(ANY_TEXT)
    def test_decode_encode(self, text):
        self.assertEqual(self.enc.decode(self.enc.encode(text)), text)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(ANY_TEXT, max_size=4))
    def test_decode_encode_with_special_tokens(self, parts):
        text = ENDOFTEXT.join(parts)
        self.assertEqual(self.enc.decode(self.enc.encode(text, allowed_special="all")), text)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.integers(0, 50256), max_size=30))
    def test_any_ids_decode(self, ids):
        expected = b"".join(self.enc.decode_bytes([i]) for i in ids).decode("utf-8", errors="replace")
        self.assertEqual(self.enc.decode(ids), expected)


class TestErrors(unittest.TestCase):
    enc = get_encoder()

    def test_decode_unknown_id_names_it(self):
        for bad in (50257, -1, 10 ** 30, "7"):
            with self.assertRaisesRegex(ValueError, f"token id {bad!r} is not in the vocabulary"):
                self.enc.decode([5, bad, 6])

    def test_unknown_special_token(self):
        with self.assertRaisesRegex(ValueError, "<|fim|>"):
            self.enc.encode("x", allowed_special={"<|fim|>"})
        with self.assertRaisesRegex(TypeError, "allowed_special"):
            self.enc.encode("x", allowed_special=ENDOFTEXT)

    def test_encode_needs_str(self):
        with self.assertRaisesRegex(TypeError, "got bytes"):
            self.enc.encode(b"bytes")

    def test_unknown_vocabulary_name(self):
        with self.assertRaisesRegex(ValueError, "gpt5"):
            get_encoder("gpt5")


class TestShippedVocabulary(unittest.TestCase):
    def test_files_are_the_shared_originals(self):
        for name, expected in GPT2_SHA256.items():
            self.assertEqual(sha256_file(DATA_DIR / "gpt2" / name), expected)
            shared = SHARED_GPT2 / name
            if shared.is_file():
                self.assertEqual((DATA_DIR / "gpt2" / name).read_bytes(), shared.read_bytes())
        self.assertIn("MIT License", (DATA_DIR / "gpt2/README.md").read_text(encoding="utf-8"))

    def test_damaged_file_is_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            for name in GPT2_SHA256:
                shutil.copy(DATA_DIR / "gpt2" / name, tmp)
            with open(Path(tmp) / "vocab.bpe", "a", encoding="utf-8") as f:
                f.write("x y\n")
            with self.assertRaisesRegex(ValueError, "vocab.bpe has sha256"):
                load_verified(tmp, GPT2_SHA256)

    def test_save_writes_byte_identical_files(self):
        with tempfile.TemporaryDirectory() as tmp:
            get_encoder().save(tmp)
            for name, expected in GPT2_SHA256.items():
                self.assertEqual(sha256_file(Path(tmp) / name), expected)

    def test_loaded_once(self):
        self.assertIs(get_encoder(), get_encoder("gpt2"))


class TestTools(unittest.TestCase):
    enc = get_encoder()

    def test_show_work_ends_at_the_ids(self):
        steps = self.enc.encode_and_show_work(" Hello  world's\n")
        self.assertEqual([s["pretoken"] for s in steps], [" Hello", " ", " world", "'s", "\n"])
        self.assertEqual([i for s in steps for i in s["ids"]], self.enc.encode(" Hello  world's\n"))
        hello = steps[0]
        self.assertEqual(hello["bytes"], "ĠHello")
        self.assertEqual(hello["parts"][0], list("ĠHello"))
        self.assertEqual(hello["parts"][-1], ["ĠHello"])

    def test_encode_batch_in_processes(self):
        texts = [mixed_text(20_000, seed=s)[s * 100:] for s in range(6)] + ["", ENDOFTEXT]
        expected = [self.enc.encode(t, allowed_special="all") for t in texts]
        self.assertEqual(self.enc.encode_batch(texts, num_workers=2, allowed_special="all"), expected)
        self.assertEqual(self.enc.encode_batch(texts, num_workers=1, allowed_special="all"), expected)

    def test_pickles(self):
        copy = pickle.loads(pickle.dumps(self.enc))
        text = mixed_text(5_000)
        self.assertEqual(copy.encode(text), self.enc.encode(text))


class TestBPETokenizer(unittest.TestCase):
    tok = BPETokenizer()

    def test_string_gives_one_row(self):
        ids = self.tok("Hello world")
        self.assertEqual(ids.dtype, torch.long)
        self.assertEqual(ids.tolist(), [[15496, 995]])
        self.assertEqual(self.tok.decode(ids[0]), "Hello world")

    def test_list_gives_a_batch(self):
        ids = self.tok(["Hello world", "dogs run"])
        self.assertEqual(tuple(ids.shape), (2, 2))
        self.assertEqual(self.tok.decode(ids), ["Hello world", "dogs run"])

    def test_ragged_batch_needs_padding(self):
        with self.assertRaisesRegex(ValueError, "pad_id"):
            self.tok(["Hello world", "Hi"])
        ids = self.tok(["Hello world", "Hi"], pad_id=50256)
        self.assertEqual(ids.tolist(), [[15496, 995], [17250, 50256]])

    def test_endoftext_is_one_token(self):
        self.assertEqual(self.tok(f"a{ENDOFTEXT}").tolist(), [[64, 50256]])


if __name__ == "__main__":
    unittest.main()
