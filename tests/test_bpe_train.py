"""train_bpe learns what BPE defines, fast, and its vocabulary works exactly like GPT-2's."""

import json
import tempfile
import unittest
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import mygpt.bpe as bpe_module
import mygpt.bpe_train as bpe_train_module
from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, Encoder, bytes_to_unicode
from mygpt.bpe_train import train_bpe
from tests.corpus import LONG_RUNS, english_and_code, lines_run, long_run, mixed_text


def naive_bpe(text, n_merges):
    """Reference training by full recount: (merges as byte-string pairs, final segmentation of each pre-token).

    At each step every pair is counted again over all pre-tokens; the most frequent wins, ties going to the smallest
    (left bytes, right bytes). A pair merged before is not merged again.
    """
    words = Counter(piece.encode("utf-8") for piece in regex.findall(GPT2_PATTERN, text))
    segments = {w: [bytes([b]) for b in w] for w in words}
    merges = []
    while len(merges) < n_merges:
        counts = Counter()
        for w, f in words.items():
            for pair in zip(segments[w], segments[w][1:]):
                if pair not in merges:
                    counts[pair] += f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, seg in segments.items():
            segments[w] = _merge_left_to_right(seg, best)
    return merges, segments


def _merge_left_to_right(seg, pair):
    out, i = [], 0
    while i < len(seg):
        if i + 1 < len(seg) and (seg[i], seg[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(seg[i])
            i += 1
    return out


def as_bytes(encoder, token):
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in token)


class TestTrainingIsBPE(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Small enough for the full recount; varied enough for ties, repeats and multi-byte characters.
        cls.text = mixed_text(12_000, seed=3)
        cls.n_merges = 300
        cls.enc = train_bpe(cls.text, 256 + cls.n_merges + 1)
        cls.reference, cls.segments = naive_bpe(cls.text, cls.n_merges)

    def test_each_merge_is_the_most_frequent_pair(self):
        learned = [(as_bytes(self.enc, a), as_bytes(self.enc, b)) for a, b in self.enc.merges]
        self.assertEqual(learned, self.reference)

    def test_encoding_gives_the_training_segmentation(self):
        for word, segments in self.segments.items():
            ids = self.enc.encode(word.decode("utf-8"))
            self.assertEqual([self.enc.decode_bytes([i]) for i in ids], segments)

    def test_layout_like_gpt2(self):
        self.assertEqual(self.enc.vocab_size, 256 + self.n_merges + 1)
        self.assertEqual(list(self.enc.encoder)[:256], list(bytes_to_unicode().values()))
        self.assertEqual(self.enc.special_tokens, {ENDOFTEXT: 256 + self.n_merges})
        self.assertEqual(self.enc.encode(ENDOFTEXT, allowed_special="all"), [256 + self.n_merges])


class TestLongPretokens(unittest.TestCase):
    """Pre-tokens thousands of bytes long (kept as positions of pairs) train exactly like short ones."""

    def test_merges_are_the_most_frequent_pairs(self):
        # Runs of 700 characters are long pre-tokens (over _LONG_WORD_BYTES); the reference recounts them whole.
        text = " ".join(long_run(kind, 700, seed=k) for k, kind in enumerate(LONG_RUNS)) + mixed_text(1_500)
        enc = train_bpe(text, 256 + 80 + 1)
        reference, segments = naive_bpe(text, 80)
        self.assertEqual([(as_bytes(enc, a), as_bytes(enc, b)) for a, b in enc.merges], reference)
        for word, parts in segments.items():
            self.assertEqual([enc.decode_bytes([i]) for i in enc.encode(word.decode("utf-8"))], parts)

    def test_overlapping_pairs_merge_left_to_right(self):
        # "a" * 101 is 50 "aa" and one "a" (never "a" "aa"), then 25 "aaaa", "a", then 12 "a" * 8, "aaaa", "a".
        enc = train_bpe("a" * 101, 256 + 3, special_tokens=())
        self.assertEqual([as_bytes(enc, a) + as_bytes(enc, b) for a, b in enc.merges], [b"aa", b"aaaa", b"a" * 8])
        pieces = [enc.decode_bytes([i]) for i in enc.encode("a" * 101)]
        self.assertEqual(pieces, [b"a" * 8] * 12 + [b"aaaa", b"a"])

    def test_work_grows_as_n_log_n_not_n_squared(self):
        """Lines of mygpt's BPE modules run to learn n/50 merges from n bytes of DNA (one pre-token), n and 4n:
        about 4x for n log n, 16x for merging and recounting the whole pre-token at every merge (shown by
        switching the positions off)."""
        def work(n):
            text = long_run("DNA", n)
            enc, lines = lines_run(lambda: train_bpe(text, 256 + n // 50, special_tokens=()), bpe_train_module,
                                   bpe_module)
            self.assertEqual(enc.decode(enc.encode(text)), text)
            return lines

        self.assertLess(work(6_000) / work(1_500), 5)
        with mock.patch.object(bpe_train_module, "_LONG_WORD_BYTES", 10 ** 9):
            self.assertGreater(work(6_000) / work(1_500), 8)


class TestTrainedEncoder(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.enc = train_bpe([mixed_text(30_000, seed=s) for s in range(3)], 1000)

    @settings(max_examples=200, deadline=None)
    @given(st.text(st.characters(codec="utf-8")))
    def test_round_trip(self, text):
        self.assertEqual(self.enc.decode(self.enc.encode(text)), text)

    def test_save_and_load(self):
        text = mixed_text(20_000, seed=9)
        with tempfile.TemporaryDirectory() as tmp:
            self.enc.save(tmp)
            loaded = Encoder.load(tmp)
            encoder = json.loads(Path(tmp, "encoder.json").read_text(encoding="utf-8"))
            header = Path(tmp, "vocab.bpe").read_text(encoding="utf-8").split("\n")[0]
        self.assertEqual(list(encoder.values()), list(range(1000)))
        self.assertEqual(header, "#version: 0.2")
        self.assertEqual(loaded.merges, self.enc.merges)
        self.assertEqual(loaded.special_tokens, {ENDOFTEXT: 999})
        self.assertEqual(loaded.encode(text), self.enc.encode(text))


class TestTrainingInput(unittest.TestCase):
    def test_special_tokens_are_cut_out_of_training_text(self):
        enc = train_bpe(f"ab{ENDOFTEXT}" * 50, 256 + 10 + 1)
        self.assertEqual([as_bytes(enc, a) + as_bytes(enc, b) for a, b in enc.merges], [b"ab"])

    def test_stops_when_nothing_is_left_to_merge(self):
        enc = train_bpe("aaaa", 400, special_tokens=())
        self.assertEqual(enc.encode("aaaa"), [enc.encoder["aaaa"]])
        self.assertEqual(enc.vocab_size, 258)

    def test_vocab_too_small(self):
        with self.assertRaisesRegex(ValueError, "vocab_size 256 is below the 256 bytes plus 1 special tokens; "
                                                "pass at least 257"):
            train_bpe("text", 256)
        with self.assertRaisesRegex(ValueError, "plus 2 special tokens; pass at least 258"):
            train_bpe("text", 257, special_tokens=["<|a|>", "<|b|>"])
        for bad in ("300", 300.0, True, None):
            with self.assertRaisesRegex(TypeError, "vocab_size must be an int"):
                train_bpe("text", bad)
        self.assertEqual(train_bpe("text text", np.int64(258)).vocab_size, 258)

    def test_special_tokens_checked(self):
        for bad in (ENDOFTEXT, None, 5, {ENDOFTEXT: 1}):
            with self.assertRaisesRegex(TypeError, "special_tokens must be a list of str"):
                train_bpe("text", 300, special_tokens=bad)
        with self.assertRaisesRegex(TypeError, "special_tokens\\[1\\] must be a str, got bytes"):
            train_bpe("text", 300, special_tokens=[ENDOFTEXT, b"<|pad|>"])
        with self.assertRaisesRegex(ValueError, "special_tokens\\[0\\] is empty"):
            train_bpe("text", 300, special_tokens=[""])
        with self.assertRaisesRegex(ValueError, "special_tokens lists \\['<\\|pad\\|>'\\] more than once"):
            train_bpe("text", 300, special_tokens=["<|pad|>", ENDOFTEXT, "<|pad|>"])

    def test_special_token_that_is_also_a_learned_token(self):
        with self.assertRaisesRegex(ValueError, "special token 'a' is also the learned token 64"):
            train_bpe("text", 300, special_tokens=["a"])
        with self.assertRaisesRegex(ValueError, "special token 'Ġthe' is also the learned token"):
            train_bpe("the the the then", 300, special_tokens=["Ġthe"])

    def test_longer_special_token_is_cut_out_whole(self):
        enc = train_bpe("xy<|a|>b" * 20, 300, special_tokens=["<|a|>", "<|a|>b"])
        self.assertEqual([as_bytes(enc, a) + as_bytes(enc, b) for a, b in enc.merges], [b"xy"])

    def test_text_checked(self):
        with self.assertRaisesRegex(TypeError, "text_or_iterator must be a str or an iterable of str, got bytes"):
            train_bpe(b"text", 300)
        with self.assertRaisesRegex(TypeError, "text_or_iterator must be a str or an iterable of str, got int"):
            train_bpe(5, 300)
        with self.assertRaisesRegex(TypeError, "text_or_iterator item 1 must be a str, got bytes"):
            train_bpe(["text", b"more"], 300)
        with self.assertRaisesRegex(ValueError, "pattern is not a valid regular expression"):
            train_bpe("text", 300, pattern="(")


class TestMegabyte(unittest.TestCase):
    def test_one_megabyte_to_4096_tokens(self):
        # the speed of this (target: under 10 s) is measured in bench/bench_bpe.py, not asserted here
        text = english_and_code(1_100_000)
        self.assertGreater(len(text.encode("utf-8")), 1_000_000)
        enc = train_bpe(text, 4096)
        self.assertEqual(enc.vocab_size, 4096)
        sample = text[:20_000]
        ids = enc.encode(sample)
        self.assertEqual(enc.decode(ids), sample)
        self.assertLess(len(ids), len(sample.encode("utf-8")) / 3)  # 4096 learned tokens compress the text


if __name__ == "__main__":
    unittest.main()
