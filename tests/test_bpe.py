"""The GPT-2 encoder gives exactly tiktoken's GPT-2 ids, round-trips any text and ships its vocabulary intact."""

import json
import os
import pickle
import re
import shutil
import signal
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

import mygpt.bpe as bpe_module
from mygpt.bpe import (
    ENDOFTEXT,
    GPT2_PATTERN,
    GPT2_SHA256,
    VOCAB_DIR,
    Encoder,
    bytes_to_unicode,
    get_encoder,
    _load_verified,
    merge_in_rank_order,
)
from mygpt.bpe_train import train_bpe
from mygpt.downloads import sha256_file
from mygpt.tokenizer import BPETokenizer
from tests.corpus import LONG_RUNS, lines_run, long_run, mixed_text

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
    return data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "gpt2/vocab.bpe"), str(VOCAB_DIR / "gpt2/encoder.json"),
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

    def test_long_runs_of_every_kind(self):
        # 40,000 characters of each kind: pre-tokens thousands of bytes long, merged through the rank-ordered path.
        for kind in LONG_RUNS:
            with self.subTest(kind=kind):
                self.assertSameIds(long_run(kind, 40_000, seed=1))

    def test_long_runs_inside_ordinary_text(self):
        runs = [long_run(kind, 3_000, seed=2) for kind in LONG_RUNS]
        self.assertSameIds(" and then ".join(runs) + mixed_text(10_000))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.one_of(KNOWN_TEXT, st.builds(lambda unit, k: unit * k, KNOWN_TEXT, st.integers(1, 300)),
                              st.text(st.sampled_from("aAbz09 é日\n+/="), min_size=100, max_size=3000)), max_size=4))
    def test_any_text_with_long_runs(self, parts):
        self.assertSameIds("".join(parts))

    def test_shipped_files_equal_the_tiktoken_ranks(self):
        shipped = data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "gpt2/vocab.bpe"), str(VOCAB_DIR / "gpt2/encoder.json"),
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


class TestRankOrder(unittest.TestCase):
    """The rank-ordered merge (any length) gives what whole passes give (GPT-2's loop), at n log n cost."""

    @classmethod
    def setUpClass(cls):
        # A trained vocabulary has merges that spell one token two ways ("ab"+"c", "a"+"bc"), so a merge can create a
        # pair of lower rank than itself: the order of passes matters there, unlike in GPT-2's own vocabulary.
        cls.trained = train_bpe(long_run("DNA", 3_000) + " " + long_run("random letters", 3_000), 600,
                                special_tokens=())
        cls.gpt2 = get_encoder()

    @settings(max_examples=200, deadline=None)
    @given(st.text(st.sampled_from("ACGTab"), max_size=400), st.booleans())
    def test_same_as_passes(self, text, use_gpt2):
        enc = self.gpt2 if use_gpt2 else self.trained
        ids = [enc._byte_ids[b] for b in text.encode("utf-8")]
        self.assertEqual(merge_in_rank_order(list(ids), enc._rank_of, enc._merge_of), enc._merge(list(ids)))

    def test_overlapping_occurrences_merge_left_to_right(self):
        enc = Encoder({**{c: i for i, c in enumerate(bytes_to_unicode().values())}, "aa": 256}, [("a", "a")])
        for n in range(1, 12):
            ids = [enc.encoder["a"]] * n
            expected = [256] * (n // 2) + [enc.encoder["a"]] * (n % 2)  # "aaa" is "aa" "a", never "a" "aa"
            self.assertEqual(merge_in_rank_order(list(ids), enc._rank_of, enc._merge_of), expected)
            self.assertEqual(enc.encode("a" * n), expected)

    def test_work_grows_as_n_log_n_not_n_squared(self):
        """Lines of mygpt/bpe.py run to encode n and 4n random letters (one pre-token), a count that is the same on
        every machine: n log n gives about 4x more, quadratic 16x; whole passes, counted the same way, show the
        measure can tell the two apart."""
        def work(n):
            text = long_run("random letters", n)
            fresh = Encoder(self.gpt2.encoder, self.gpt2.merges)
            ids, lines = lines_run(lambda: fresh.encode(text), bpe_module)
            self.assertEqual(ids, self.gpt2.encode(text))
            return lines

        self.assertLess(work(2_400) / work(600), 5)
        with mock.patch.object(bpe_module, "HEAP_FROM_BYTES", 10 ** 9):
            self.assertGreater(work(2_400) / work(600), 8)


class TestErrors(unittest.TestCase):
    enc = get_encoder()

    def test_decode_unknown_id_names_it(self):
        for bad in (50257, -1, -50257, 10 ** 30, np.int64(50300)):
            pattern = f"ids\\[1\\] = {re.escape(repr(bad))} is not a token id .*0..50256"
            with self.assertRaisesRegex(ValueError, pattern):
                self.enc.decode([5, bad, 6])

    def test_decode_refuses_every_id_outside_the_vocabulary(self):
        # -100000 once decoded as ' us': a negative id indexed the decode table from its end
        top = tiktoken_gpt2().n_vocab - 1
        tok = BPETokenizer()
        decoders = (self.enc.decode, self.enc.decode_bytes, tok.decode)
        for bad in (-1, -100000, top + 1, 10 ** 20):
            # a torch tensor holds 64-bit ids at most: the extremes stand in for 10**20
            torch_bad = max(min(bad, 2 ** 63 - 1), -2 ** 63)
            for ids in ([5, bad, 6], np.array([5, bad, 6]), torch.tensor([5, torch_bad, 6])):
                shown = re.escape(str(int(ids[1])))
                for decode in decoders:
                    with self.subTest(bad=bad, ids=type(ids).__name__, decode=decode.__qualname__), \
                            self.assertRaisesRegex(ValueError, f"ids\\[1\\] = {shown} is not a token id .*0..{top}"):
                        decode(ids)

    def test_decode_refuses_ids_that_are_not_ints(self):
        for bad in ("7", 7.0, True, np.True_, None, [1, 2], (3,)):
            with self.assertRaisesRegex(TypeError, "ids\\[1\\] is .*token ids must be ints"):
                self.enc.decode([5, bad, 6])
        with self.assertRaisesRegex(TypeError, "decode one sequence at a time"):
            self.enc.decode([[1, 2], [3]])
        for bad in ("hello", b"hi", 5, None, {1: 2}):
            with self.assertRaisesRegex(TypeError, "ids must be a sequence of int token ids"):
                self.enc.decode(bad)

    def test_decode_takes_numpy_and_torch_integers(self):
        ids = self.enc.encode("Hello wörld")
        for given_ids in (np.array(ids, dtype=np.int64), np.array(ids, dtype=np.uint16), torch.tensor(ids),
                          [np.int32(i) for i in ids], tuple(ids), iter(ids)):
            self.assertEqual(self.enc.decode(given_ids), "Hello wörld")
        for bad in (np.array(ids, dtype=np.float32), torch.tensor(ids).bool(), torch.tensor(ids).float()):
            with self.assertRaisesRegex(TypeError, "ids must hold integer token ids"):
                self.enc.decode(bad)
        with self.assertRaisesRegex(ValueError, "ids must be 1-D"):
            self.enc.decode(np.array([ids]))

    def test_unknown_special_token(self):
        with self.assertRaisesRegex(ValueError, "<|fim|>"):
            self.enc.encode("x", allowed_special={"<|fim|>"})
        for bad in (ENDOFTEXT, None, 5, (t for t in [ENDOFTEXT])):
            with self.assertRaisesRegex(TypeError, "allowed_special must be \"all\" or a set"):
                self.enc.encode("x", allowed_special=bad)
        with self.assertRaisesRegex(TypeError, "each token of allowed_special must be a str"):
            self.enc.encode("x", allowed_special={5})

    def test_encode_needs_str(self):
        for method in (self.enc.encode, self.enc.encode_ordinary, self.enc.encode_and_show_work):
            with self.assertRaisesRegex(TypeError, "text must be a str, got bytes; decode bytes to text first"):
                method(b"bytes")
            for bad in (None, 5, ["a"]):
                with self.assertRaisesRegex(TypeError, f"text must be a str, got {type(bad).__name__}"):
                    method(bad)

    def test_encode_batch_arguments(self):
        with self.assertRaisesRegex(TypeError, "texts must be a list of str, got str; for one text, use encode"):
            self.enc.encode_batch("one text")
        with self.assertRaisesRegex(TypeError, "texts\\[1\\] must be a str, got bytes"):
            self.enc.encode_batch(["a", b"b"])
        with self.assertRaisesRegex(ValueError, "num_workers must be >= 1"):
            self.enc.encode_batch(["a"], num_workers=0)
        for bad in (True, 2.0, "2"):
            with self.assertRaisesRegex(TypeError, "num_workers must be an int"):
                self.enc.encode_batch(["a"], num_workers=bad)
        self.assertEqual(self.enc.encode_batch(("a", "b"), num_workers=np.int64(1)), [[64], [65]])

    def test_constructor_arguments(self):
        with self.assertRaisesRegex(ValueError, "pattern is not a valid regular expression"):
            Encoder(self.enc.encoder, self.enc.merges, pattern="(")
        with self.assertRaisesRegex(TypeError, "pattern must be a str"):
            Encoder(self.enc.encoder, self.enc.merges, pattern=None)
        with self.assertRaisesRegex(ValueError, "cache_size must be >= 0"):
            Encoder(self.enc.encoder, self.enc.merges, cache_size=-1)
        with self.assertRaisesRegex(TypeError, "encoder must map each token"):
            Encoder(list(self.enc.encoder), self.enc.merges)
        with self.assertRaisesRegex(TypeError, "merges must be a list"):
            Encoder(self.enc.encoder, "Ġ t")
        with self.assertRaisesRegex(ValueError, "merges\\[2\\]: a merge must be two tokens"):
            Encoder(self.enc.encoder, [("Ġ", "t"), ("Ġ", "a"), ("h", "e", "y")])

    def test_unknown_vocabulary_name(self):
        with self.assertRaisesRegex(ValueError, "unknown vocabulary 'gpt5'.*pass the folder"):
            get_encoder("gpt5")
        with self.assertRaisesRegex(TypeError, "name must be a str or path"):
            get_encoder(5)


def tiny_vocabulary():
    """(encoder, merges) of a small vocabulary in GPT-2's layout: bytes, the merges of "Ġthe" and "hello", a special."""
    encoder = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("he", "ll"), ("hell", "o")]
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder[ENDOFTEXT] = len(encoder)
    return encoder, merges


class TestVocabularyFiles(unittest.TestCase):
    """Encoder.load and get_encoder(folder) check the files' structure; every error names the file."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        Encoder(*tiny_vocabulary()).save(self.dir)
        self.encoder_path, self.merges_path = self.dir / "encoder.json", self.dir / "vocab.bpe"

    def assertLoadFails(self, error, pattern, path):
        for load in (Encoder.load, get_encoder):
            with self.assertRaisesRegex(error, pattern) as caught:
                load(self.dir)
            self.assertIn(str(path), str(caught.exception))

    def edit_encoder(self, change):
        encoder = json.loads(self.encoder_path.read_text(encoding="utf-8"))
        change(encoder)
        self.encoder_path.write_text(json.dumps(encoder), encoding="utf-8")

    def edit_merges(self, change):
        self.merges_path.write_text(change(self.merges_path.read_text(encoding="utf-8")), encoding="utf-8")

    def test_good_files_load(self):
        for load in (Encoder.load, get_encoder):
            enc = load(self.dir)
            self.assertEqual(enc.encode(" the hello"), [enc.encoder["Ġthe"], 220, enc.encoder["hello"]])
            self.assertEqual(enc.special_tokens, {ENDOFTEXT: 262})

    def test_missing_header(self):
        self.edit_merges(lambda text: text.split("\n", 1)[1])
        self.assertLoadFails(ValueError, "line 1 must be the header '#version: 0.2', got 'Ġ t'", self.merges_path)

    def test_cut_short(self):
        self.edit_merges(lambda text: text[:-3])
        self.assertLoadFails(ValueError, "does not end with a newline: the file may be cut short", self.merges_path)

    def test_malformed_merge_line(self):
        self.edit_merges(lambda text: text.replace("h e\n", "h e x\n"))
        self.assertLoadFails(ValueError, "line 3: a merge line is two tokens separated by one space, got 'h e x'",
                             self.merges_path)
        self.edit_merges(lambda text: text.replace("h e x\n", "\n"))
        self.assertLoadFails(ValueError, "line 3: a merge line is two tokens", self.merges_path)

    def test_merge_of_tokens_the_encoder_lacks(self):
        self.edit_encoder(lambda encoder: encoder.pop("Ġt"))
        self.assertLoadFails(ValueError, "line 2: merge 'Ġ t' needs token 'Ġt', which .*encoder.json lacks",
                             self.merges_path)

    def test_repeated_merge(self):
        self.edit_merges(lambda text: text + "h e\n")
        self.assertLoadFails(ValueError, "line 8: merge 'h e' repeats .*vocab.bpe line 3; delete one",
                             self.merges_path)

    def test_token_made_by_two_merges(self):
        self.edit_merges(lambda text: text + "e l\nh el\nhel l\n")
        self.edit_encoder(lambda encoder: encoder.update({"el": 263, "hel": 264}))
        self.assertLoadFails(ValueError, "line 10: merge 'hel l' makes 'hell', which .*vocab.bpe line 6 already makes; "
                             "delete one", self.merges_path)

    def test_merges_cut_at_a_line(self):
        # lines 5..7 make 'll', 'hell' and 'hello'; without them those would pass for special tokens
        self.edit_merges(lambda text: "".join(text.splitlines(keepends=True)[:4]))
        self.assertLoadFails(ValueError, "line 5: no merge makes token 'll' \\(id 259\\) of .*encoder.json, though it "
                             "joins tokens 'l' and 'l'.*cut short", self.merges_path)
        with self.assertRaisesRegex(ValueError, "merges\\[3\\]: no merge makes token 'll'"):
            Encoder(tiny_vocabulary()[0], tiny_vocabulary()[1][:3])

    def test_fewer_tokens_than_the_merges_need(self):
        self.edit_encoder(lambda encoder: [encoder.pop(t) for t in ("hello", ENDOFTEXT)])
        self.assertLoadFails(ValueError, "line 7: merge 'hell o' needs token 'hello'.*it has 261 tokens",
                             self.merges_path)

    def test_malformed_json(self):
        self.encoder_path.write_text('{"a": 1,', encoding="utf-8")
        self.assertLoadFails(ValueError, "is not valid JSON: .* at line 1, column 9", self.encoder_path)
        self.encoder_path.write_text("[1, 2]", encoding="utf-8")
        self.assertLoadFails(ValueError, "must hold a JSON object of token -> id, got a list", self.encoder_path)
        self.encoder_path.write_bytes(b'{"\xff": 1}')
        self.assertLoadFails(ValueError, "is not UTF-8 text", self.encoder_path)

    def test_duplicate_token(self):
        text = self.encoder_path.read_text(encoding="utf-8")
        self.encoder_path.write_text(text[:-1] + ', "hello": 5}', encoding="utf-8")
        self.assertLoadFails(ValueError, "token 'hello' appears twice", self.encoder_path)

    def test_shared_id(self):
        self.edit_encoder(lambda encoder: encoder.update({"hello": 3}))
        self.assertLoadFails(ValueError, "tokens .* share id 3; each token needs its own", self.encoder_path)

    def test_id_out_of_range(self):
        for bad in (263, -1, 10 ** 6):
            self.edit_encoder(lambda encoder, bad=bad: encoder.update({ENDOFTEXT: bad}))
            self.assertLoadFails(ValueError, f"token '<|endoftext|>' has id {bad}, outside 0..262", self.encoder_path)

    def test_id_not_an_int(self):
        for bad in ("5", 5.0, True, None):
            self.edit_encoder(lambda encoder, bad=bad: encoder.update({ENDOFTEXT: bad}))
            self.assertLoadFails(ValueError, "the id of token '<|endoftext|>' must be an int", self.encoder_path)

    def test_missing_byte_token(self):
        self.edit_encoder(lambda encoder: encoder.pop("Ā"))
        self.assertLoadFails(ValueError, "lacks byte tokens 'Ā' \\(byte 0\\)", self.encoder_path)

    def test_missing_files(self):
        self.merges_path.unlink()
        self.assertLoadFails(FileNotFoundError, "is missing: a vocabulary folder holds encoder.json and vocab.bpe",
                             self.merges_path)
        self.encoder_path.unlink()
        self.assertLoadFails(FileNotFoundError, "is missing", self.encoder_path)
        with self.assertRaisesRegex(FileNotFoundError, "is not a directory"):
            Encoder.load(self.dir / "nowhere")


class TestGPT2MergesFile(unittest.TestCase):
    """GPT-2's encoder.json beside a damaged copy of its vocab.bpe is refused, naming the first line that disagrees.

    Expected tokens come from tiktoken's ranks: in GPT-2, the merge on line L makes the token of rank L + 254.
    """

    @classmethod
    def setUpClass(cls):
        tmp = tempfile.TemporaryDirectory()
        cls.addClassCleanup(tmp.cleanup)
        cls.dir = Path(tmp.name)
        shutil.copy(VOCAB_DIR / "gpt2/encoder.json", cls.dir)
        cls.path = cls.dir / "vocab.bpe"
        cls.lines = (VOCAB_DIR / "gpt2/vocab.bpe").read_text(encoding="utf-8").splitlines(keepends=True)
        alphabet = bytes_to_unicode()
        cls.token_of_rank = {rank: "".join(alphabet[b] for b in data) for data, rank in tiktoken_ranks().items()}

    def assertRefusedAt(self, lines, line, pattern):
        self.path.write_text("".join(lines), encoding="utf-8")
        with self.assertRaisesRegex(ValueError, f"^{re.escape(str(self.path))} line {line}: {pattern}"):
            Encoder.load(self.dir)

    def test_full_files_load_and_match_tiktoken(self):
        self.path.write_text("".join(self.lines), encoding="utf-8")
        enc, tk = Encoder.load(self.dir), tiktoken_gpt2()
        text = mixed_text(20_000) + ENDOFTEXT
        self.assertEqual(enc.encode(text, allowed_special="all"), tk.encode(text, allowed_special="all"))
        self.assertEqual(enc.special_tokens, {ENDOFTEXT: 50256})

    def test_cut_at_a_line_boundary(self):
        self.assertEqual(len(self.lines), 50_001)
        for kept in (1, 2, 25_001, 50_000):  # the header alone, one merge, half of them, all but the last
            with self.subTest(kept=kept):
                missing = re.escape(repr(self.token_of_rank[kept + 255]))
                self.assertRefusedAt(self.lines[:kept], kept + 1, f"no merge makes token {missing} \\(id "
                                     f"{kept + 255}\\) of .*encoder.json, .*cut short")

    def test_line_lost_in_the_middle(self):
        missing = re.escape(repr(self.token_of_rank[1000 + 254]))
        self.assertRefusedAt(self.lines[:999] + self.lines[1000:], 1000, f"no merge makes token {missing} ")

    def test_merge_of_a_token_the_encoder_lacks(self):
        self.assertRefusedAt(self.lines[:9] + ["Ġthe Ġthe\n"] + self.lines[9:], 10,
                             "merge 'Ġthe Ġthe' needs token 'ĠtheĠthe', which .*encoder.json lacks")

    def test_duplicated_line(self):
        self.assertRefusedAt(self.lines[:1000] + self.lines[999:], 1001,
                             f"merge {re.escape(repr(self.lines[999].strip()))} repeats .*vocab.bpe line 1000")

    def test_token_made_by_two_merges(self):
        made_at = tiktoken_ranks()[b" the"] - 254
        self.assertRefusedAt(self.lines + ["Ġ the\n"], 50_002,
                             f"merge 'Ġ the' makes 'Ġthe', which .*vocab.bpe line {made_at} already makes")


class TestShippedVocabulary(unittest.TestCase):
    def test_files_are_the_shared_originals(self):
        for name, expected in GPT2_SHA256.items():
            self.assertEqual(sha256_file(VOCAB_DIR / "gpt2" / name), expected)
            shared = SHARED_GPT2 / name
            if shared.is_file():
                self.assertEqual((VOCAB_DIR / "gpt2" / name).read_bytes(), shared.read_bytes())
        self.assertIn("MIT License", (VOCAB_DIR / "gpt2/README.md").read_text(encoding="utf-8"))

    def test_damaged_file_is_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            for name in GPT2_SHA256:
                shutil.copy(VOCAB_DIR / "gpt2" / name, tmp)
            with open(Path(tmp) / "vocab.bpe", "a", encoding="utf-8") as f:
                f.write("x y\n")
            with self.assertRaisesRegex(ValueError, "vocab.bpe has sha256"):
                _load_verified(tmp, GPT2_SHA256)

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

    def test_encode_batch_names_a_dead_worker(self):
        # a Pool replaces a killed worker and waits forever for the texts it held; encode_batch says what happened
        with mock.patch.object(bpe_module, "_encode_texts", die_on_word), self.assertRaisesRegex(
                ChildProcessError, r"encoding process \d+ was killed by SIGKILL .*before encode_batch finished"):
            self.enc.encode_batch(["some text", "die"], num_workers=2)

    def test_pickles(self):
        copy = pickle.loads(pickle.dumps(self.enc))
        text = mixed_text(5_000)
        self.assertEqual(copy.encode(text), self.enc.encode(text))


def die_on_word(state, texts, encode_texts=bpe_module._encode_texts):
    """encode_batch's work in a worker process, which the OOM killer kills at the text "die"."""
    if "die" in texts:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode_texts(state, texts)


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

    def test_decode_batches_of_every_kind(self):
        ids = self.tok(["Hello world", "dogs run"])
        for batch in (ids, ids.numpy(), ids.tolist()):
            self.assertEqual(self.tok.decode(batch), ["Hello world", "dogs run"])
        self.assertEqual(self.tok.decode(ids.numpy()[0]), "Hello world")
        with self.assertRaisesRegex(ValueError, "ids must be 1-D .* or 2-D .*, got shape \\(1, 2, 2\\)"):
            self.tok.decode(ids[None])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(TypeError, "text must be a str, got bytes"):
            self.tok(b"Hello")
        with self.assertRaisesRegex(TypeError, "text\\[1\\] must be a str, got int"):
            self.tok(["Hello", 5])
        with self.assertRaisesRegex(TypeError, "pad_id must be an int, got 'x'"):
            self.tok(["Hello", "Hi there"], pad_id="x")
        with self.assertRaisesRegex(ValueError, "pad_id must be a token id \\(>= 0\\) or -1"):
            self.tok(["Hello", "Hi there"], pad_id=-2)
        self.assertEqual(self.tok(["a", "a b"], pad_id=np.int64(-1)).tolist(), [[64, -1], [64, 275]])
        with self.assertRaisesRegex(TypeError, "encoder must be an Encoder"):
            BPETokenizer(encoder="gpt2")
        with self.assertRaisesRegex(ValueError, "allowed_special names \\['<\\|x\\|>'\\]"):
            BPETokenizer(allowed_special={"<|x|>"})


if __name__ == "__main__":
    unittest.main()
