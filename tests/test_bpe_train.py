"""train_bpe learns what BPE defines, fast, and its vocabulary works exactly like GPT-2's."""

import json
import tempfile
import unittest
from collections import Counter
from pathlib import Path

import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, Encoder, bytes_to_unicode
from mygpt.bpe_train import train_bpe
from tests.corpus import english_and_code, mixed_text


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
        with self.assertRaisesRegex(ValueError, "256 bytes"):
            train_bpe("text", 256)


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
