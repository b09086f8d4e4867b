"""Token shards in llm.c's layout, prepare_corpus against tiktoken, and TokenDataset against plain numpy slicing."""

import hashlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.data import DataLoader

import mygpt.data as data
from mygpt.bpe import ENDOFTEXT, Encoder, get_encoder
from mygpt.bpe_train import train_bpe
from mygpt.data import ShardError, TokenDataset, prepare_corpus, read_header, write_shard
from mygpt.tokenizer import describe_tokenizer, load_tokenizer
from mygpt.utils import InUseError
from tests.corpus import mixed_text
from tests.test_bpe import tiktoken_gpt2
from tests.helpers import process_level

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


def numpy_shard(path, tokens, magic=20240520, version=1, count=None, dtype="<u2"):
    """A shard as llm.c's own writer makes it, by plain numpy: 256 int32 header, then the tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        header.tofile(f)
        np.asarray(tokens, dtype=dtype).tofile(f)


def tokens_of(out_dir, split):
    """One split's token stream, read by plain numpy from the shard files."""
    files = sorted(Path(out_dir).glob(f"{split}_*.bin"))
    return np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in files] or [np.zeros(0, "<u2")])


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def is_val(index, seed, fraction):
    """The documented split rule, written out again."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def vm_rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class TempDir(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self._tmp.name)

    def tearDown(self):
        self._tmp.cleanup()


class TestShardFormat(TempDir):
    def test_round_trip_uint16_and_uint32(self):
        rng = np.random.default_rng(0)
        for high, magic, version, dtype in ((50257, 20240520, 1, "<u2"), (100_000, 20240801, 7, "<u4")):
            tokens = rng.integers(0, high, size=1000)
            path = self.dir / f"s{high}.bin"
            write_shard(path, tokens)
            header = read_header(path)
            self.assertEqual((header.magic, header.version, header.num_tokens), (magic, version, 1000))
            raw = np.fromfile(path, dtype="<i4", count=256)
            self.assertEqual(raw[:3].tolist(), [magic, version, 1000])
            self.assertFalse(raw[3:].any())
            self.assertEqual(np.fromfile(path, dtype=dtype, offset=1024).tolist(), tokens.tolist())
            self.assertEqual(path.stat().st_size, 1024 + 1000 * np.dtype(dtype).itemsize)
        write_shard(self.dir / "small.bin", [1, 2], dtype=np.uint32)  # uint32 on request
        self.assertEqual(read_header(self.dir / "small.bin").version, 7)
        self.assertEqual(sorted(os.listdir(self.dir)), ["s100000.bin", "s50257.bin", "small.bin"])  # no temp files

    def test_write_shard_refuses_bad_tokens_and_keeps_the_old_file(self):
        path = self.dir / "s.bin"
        write_shard(path, [1, 2, 3])
        for tokens, dtype, error in (([-1], None, ValueError), ([70000], np.uint16, ValueError),
                                     ([[1, 2]], None, TypeError), ([1.5], None, TypeError)):
            with self.subTest(tokens=tokens), self.assertRaises(error):
                write_shard(path, tokens, dtype=dtype)
        with mock.patch("os.fsync", side_effect=OSError("disk full")), self.assertRaisesRegex(OSError, "disk full"):
            write_shard(path, [9, 9, 9, 9])
        self.assertEqual(read_header(path).num_tokens, 3)
        self.assertEqual(os.listdir(self.dir), ["s.bin"])

    def test_every_bad_file_is_named(self):
        good = np.arange(100)
        cases = {
            "short.bin": lambda p: p.write_bytes(b"\x00" * 10),
            "foreign.bin": lambda p: numpy_shard(p, good, magic=12345),
            "newer.bin": lambda p: numpy_shard(p, good, version=2),
            "truncated.bin": lambda p: numpy_shard(p, good, count=101),
            "trailing.bin": lambda p: numpy_shard(p, good, count=99),
            "u32_as_v1.bin": lambda p: numpy_shard(p, good, magic=20240801, version=1, dtype="<u4"),
        }
        messages = {"short.bin": "too short.*headerless=True", "foreign.bin": "magic 12345.*headerless=True",
                    "newer.bin": "version 2 is unknown", "truncated.bin": "truncated.*101 tokens",
                    "trailing.bin": "bytes after its 99 tokens", "u32_as_v1.bin": "version 1 is unknown"}
        for name, make in cases.items():
            path = self.dir / name
            make(path)
            for read in (read_header, lambda p: TokenDataset(p, 4)):
                with self.subTest(name=name), self.assertRaisesRegex(ShardError, messages[name]) as caught:
                    read(path)
                self.assertIn(str(path), str(caught.exception))
        with self.assertRaisesRegex(FileNotFoundError, "missing.bin"):
            TokenDataset(self.dir / "missing.bin", 4)
        with self.assertRaisesRegex(FileNotFoundError, "no shard files match"):
            TokenDataset(str(self.dir / "nothing_*.bin"), 4)
        with self.assertRaisesRegex(IsADirectoryError, "train_"):
            TokenDataset(self.dir, 4)


class TestTokenDataset(TempDir):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(1)
        self.parts = [rng.integers(0, 50257, size=n) for n in (100, 0, 3, 60)]  # an empty and a tiny shard too
        for i, part in enumerate(self.parts):
            numpy_shard(self.dir / f"train_{i:06d}.bin", part)
        self.stream = np.concatenate(self.parts)

    def test_windows_of_llmc_shards_written_by_numpy(self):
        ds = TokenDataset(str(self.dir / "train_*.bin"), block_size=8)
        self.assertEqual(ds.num_tokens, 163)
        self.assertEqual(len(ds), (163 - 1) // 8)
        for i in range(len(ds)):  # window 12 crosses from the first shard through the 3-token one into the last
            x, y = ds[i]
            self.assertEqual(x.dtype, torch.int64)
            self.assertEqual(x.tolist(), self.stream[8 * i:8 * i + 8].tolist())
            self.assertEqual(y.tolist(), self.stream[8 * i + 1:8 * i + 9].tolist())
        self.assertEqual(ds[-1][0].tolist(), ds[len(ds) - 1][0].tolist())
        with self.assertRaisesRegex(IndexError, "window 20 is outside"):
            ds[len(ds)]
        xb, yb = ds.get_batch([3, 12, 0])
        self.assertEqual(xb.shape, (3, 8))
        for row, i in enumerate([3, 12, 0]):
            self.assertTrue(torch.equal(xb[row], ds[i][0]) and torch.equal(yb[row], ds[i][1]))
        x, y = ds[0]
        y[0] = -1  # masking targets leaves the inputs alone
        self.assertEqual(x[1].item(), self.stream[1])

    def test_a_list_of_paths_in_the_given_order(self):
        ds = TokenDataset([self.dir / "train_000003.bin", self.dir / "train_000000.bin"], block_size=10)
        stream = np.concatenate([self.parts[3], self.parts[0]])
        self.assertEqual(ds[5][0].tolist(), stream[50:60].tolist())

    def test_block_longer_than_the_corpus(self):
        with self.assertRaisesRegex(ValueError, "block_size 163 needs at least 164 tokens.*train_000000.bin"):
            TokenDataset(str(self.dir / "train_*.bin"), block_size=163)
        self.assertEqual(len(TokenDataset(str(self.dir / "train_*.bin"), block_size=162)), 1)
        for bad in (0, -1, 2.0, True):
            with self.subTest(block_size=bad), self.assertRaisesRegex(ValueError, "block_size"):
                TokenDataset(str(self.dir / "train_*.bin"), block_size=bad)

    def test_nanogpt_headerless_bin_only_when_asked(self):
        tokens = np.random.default_rng(2).integers(0, 50257, size=500).astype(np.uint16)
        tokens.tofile(self.dir / "train.bin")  # exactly how nanoGPT's prepare.py writes it
        ds = TokenDataset(self.dir / "train.bin", block_size=16, headerless=True)
        self.assertEqual((ds.num_tokens, len(ds)), (500, 31))
        self.assertEqual(ds[30][1].tolist(), tokens[481:497].tolist())
        with self.assertRaisesRegex(ShardError, "headerless=True"):
            TokenDataset(self.dir / "train.bin", block_size=16)

    def test_vocab_size_from_meta_json(self):
        self.assertIsNone(TokenDataset(str(self.dir / "train_*.bin"), 8).vocab_size)
        (self.dir / "meta.json").write_text(json.dumps({"vocab_size": 50257}))
        self.assertEqual(TokenDataset(str(self.dir / "train_*.bin"), 8).vocab_size, 50257)

    def test_pickles_without_data_and_loads_in_workers(self):
        ds = TokenDataset(str(self.dir / "train_*.bin"), block_size=4)
        ds[len(ds) - 1]  # opens the memmaps
        self.assertLess(len(pickle.dumps(ds)), 2000)
        expected = torch.stack([ds[i][0] for i in range(len(ds))])
        loader = DataLoader(ds, batch_size=5, num_workers=2)
        self.assertTrue(torch.equal(torch.cat([x for x, _ in loader]), expected))

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads VmRSS from /proc")
    def test_ten_billion_tokens_in_constant_memory(self):
        # 5 sparse shards of 2e9 tokens (a shard's int32 count stops at 2**31 - 1); only the pages written hold data
        per_shard, block = 2 * 10**9, 1024
        start, end = np.random.default_rng(3).integers(0, 50257, size=(2, 3000))
        before = vm_rss_kib()
        for i in range(5):
            path = self.dir / f"big_{i:06d}.bin"
            numpy_shard(path, [], count=per_shard)
            with open(path, "r+b") as f:
                f.truncate(1024 + 2 * per_shard)
                if i == 1:  # the first tokens of shard 1
                    f.seek(1024)
                    f.write(start.astype("<u2").tobytes())
                if i == 4:  # the last tokens of the corpus
                    f.seek(1024 + 2 * (per_shard - len(end)))
                    f.write(end.astype("<u2").tobytes())
        if os.stat(self.dir / "big_000000.bin").st_blocks * 512 > 10**8:
            self.skipTest("this file system does not keep files sparse")
        ds = TokenDataset(str(self.dir / "big_*.bin"), block_size=block)
        self.assertEqual(ds.num_tokens, 10**10)
        self.assertEqual(len(ds), (10**10 - 1) // block)
        stream_end = np.concatenate([np.zeros(block, dtype=np.int64), end])  # the last window, read by hand
        last = len(ds) - 1
        first = last * block - (10**10 - len(stream_end))
        x, y = ds[last]
        self.assertEqual(x.tolist(), stream_end[first:first + block].tolist())
        self.assertEqual(y.tolist(), stream_end[first + 1:first + block + 1].tolist())
        crossing = per_shard // block  # starts in shard 0, ends in shard 1
        x, _ = ds[crossing]
        head = per_shard - crossing * block
        self.assertEqual(x[head:].tolist(), start[:block - head].tolist())
        self.assertFalse(x[:head].any())
        ds.get_batch(np.random.default_rng(4).integers(0, len(ds), size=64))
        grown_mib = (vm_rss_kib() - before) / 1024
        self.assertLess(grown_mib, 30)


class TestPrepare(TempDir):
    @classmethod
    def setUpClass(cls):
        cls.tk = tiktoken_gpt2()

    def make_folder(self):
        """A small mixed folder; returns its documents in the order prepare reads them."""
        src = self.dir / "src"
        (src / "b_sub" / "deeper").mkdir(parents=True)
        texts = {
            "a.txt": "Hello world.\r\nSecond line — café, naïve.\n\n  indented\t tab",
            "b_sub/deeper/c.txt": "日本語のテキスト 🙂 and " + ENDOFTEXT + " written in the text",
            "b_sub/empty.txt": "",
            "d.md": mixed_text(3000, seed=1),
        }
        for name, text in texts.items():
            (src / name).write_bytes(text.encode("utf-8"))
        (src / ".hidden.txt").write_bytes(b"\xff not text, and hidden")
        rows = [{"text": "first json document"}, {"text": ""}, {"text": "Ελληνικά\nκείμενο", "id": 3},
                {"text": "x" * 50}]
        (src / "b_sub" / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n"
                                               + "\n".join(json.dumps(r) for r in rows[2:]) + "\n", encoding="utf-8")
        # sorted paths: a.txt, b_sub/deeper/c.txt, b_sub/e.jsonl, b_sub/empty.txt, d.md; text files as open() reads
        # them, "\r\n" as "\n"
        read = {name: (src / name).read_text(encoding="utf-8") for name in texts}
        self.assertEqual(read["a.txt"].count("\r"), 0)
        documents = [read["a.txt"], read["b_sub/deeper/c.txt"], *[r["text"] for r in rows], "", read["d.md"]]
        return src, documents

    def reference(self, documents, seed, fraction, encode=None, eot=EOT):
        """Each split's tokens by encoding the documents one by one (empty ones skipped)."""
        encode = encode or self.tk.encode_ordinary
        splits = {"train": [], "val": []}
        for i, doc in enumerate(documents):
            if doc:
                splits["val" if is_val(i, seed, fraction) else "train"] += encode(doc) + [eot]
        return splits

    def test_mixed_folder_equals_encoding_documents_one_by_one(self):
        src, documents = self.make_folder()
        seed, fraction = 3, 0.3
        expected = self.reference(documents, seed, fraction)
        self.assertTrue(expected["train"] and expected["val"])
        meta = prepare_corpus(src, self.dir / "out", val_fraction=fraction, seed=seed, shard_tokens=100,
                              num_workers=1, progress=False)
        for split in ("train", "val"):
            self.assertEqual(tokens_of(self.dir / "out", split).tolist(), expected[split])
            counts = [read_header(p).num_tokens for p in sorted((self.dir / "out").glob(f"{split}_*.bin"))]
            self.assertEqual(counts, [100] * (len(counts) - 1) + [len(expected[split]) - 100 * (len(counts) - 1)])
            self.assertEqual(meta[split]["tokens"], len(expected[split]))
            self.assertEqual(meta[split]["shards"], len(counts))
        self.assertEqual(meta["train"]["documents"] + meta["val"]["documents"], 6)  # 8 minus 2 empty
        self.assertEqual((meta["vocab_size"], meta["eot"], meta["dtype"]), (50257, EOT, "uint16"))
        self.assertEqual(meta["settings"]["tokenizer"], {"type": "gpt2"})
        self.assertEqual(meta["text_bytes"], sum(len(d.encode("utf-8")) for d in documents))
        on_disk = json.loads((self.dir / "out" / "meta.json").read_text(encoding="utf-8"))
        self.assertEqual(on_disk, meta)
        self.assertFalse((self.dir / "out" / "prepare.json").exists())
        ds = TokenDataset(str(self.dir / "out" / "train_*.bin"), block_size=32)
        self.assertEqual(ds.vocab_size, 50257)
        self.assertEqual(ds[2][0].tolist(), expected["train"][64:96])

    def test_same_bytes_for_one_and_two_workers(self):
        src, _ = self.make_folder()
        for workers in (1, 2):
            prepare_corpus(src, self.dir / f"out{workers}", val_fraction=0.3, seed=3, shard_tokens=64,
                           num_workers=workers, progress=False)
        with mock.patch.object(data, "UNIT_CHARS", 100):  # many work units in flight between the processes
            prepare_corpus(src, self.dir / "out3", val_fraction=0.3, seed=3, shard_tokens=64, num_workers=2,
                           progress=False)
        self.assertTrue(any((self.dir / "out1").glob("val_*.bin")))
        self.assertEqual(files_of(self.dir / "out1"), files_of(self.dir / "out2"))
        self.assertEqual(files_of(self.dir / "out1"), files_of(self.dir / "out3"))

    def test_long_documents_are_cut_where_tokens_do_not_change(self):
        text = mixed_text(40_000, seed=5)
        (self.dir / "long.txt").write_text(text, encoding="utf-8", newline="")
        with mock.patch.object(data, "PIECE_CHARS", 2000), mock.patch.object(data, "UNIT_CHARS", 3000):
            prepare_corpus(self.dir / "long.txt", self.dir / "out", val_fraction=0, num_workers=2, progress=False)
        read = (self.dir / "long.txt").read_text(encoding="utf-8")  # "\r\n" as "\n", also across blocks
        self.assertEqual(tokens_of(self.dir / "out", "train").tolist(), self.tk.encode_ordinary(read) + [EOT])

    def test_cuts_keep_tiktoken_ids_wherever_they_fall(self):
        # every kind of neighbour a cut may have: letters (contractions' too), digits, symbols, apostrophes, spaces
        alphabet = [*"abstrvmldSé", *"019٣", *"'-!.", " ", "\n", "\t", "\u00a0", "\u3000"]
        text = "".join(random.Random(0).choices(alphabet, k=20_000))
        blocks = (text[i:i + 1000] for i in range(0, len(text), 1000))
        with mock.patch.object(data, "PIECE_CHARS", 40):
            pieces = [piece for piece, _ in data._pieces(blocks, data._cut_gpt2, 0)]
        self.assertGreater(len(pieces), 500)
        self.assertEqual("".join(pieces), text)
        self.assertEqual([i for p in pieces for i in self.tk.encode_ordinary(p)], self.tk.encode_ordinary(text))

    def test_documents_without_spaces_equal_tiktoken_and_overlong_runs_are_named(self):
        rng = random.Random(1)
        letters = "".join(rng.choices("ACGT", k=7000))  # one pre-token longer than a piece
        base64 = "".join(rng.choices("abcXYZ0189+/=", k=9000))  # no space, but letters, digits and symbols meet
        for name, text in (("letters", letters), ("base64", base64), ("both", letters + "7" + base64)):
            (self.dir / f"{name}.txt").write_text(text, encoding="utf-8")
            with self.subTest(name), mock.patch.object(data, "PIECE_CHARS", 2000), \
                    mock.patch.object(data, "MAX_PIECE_CHARS", 8000):
                prepare_corpus(self.dir / f"{name}.txt", self.dir / name, val_fraction=0, num_workers=1,
                               progress=False)
                self.assertEqual(tokens_of(self.dir / name, "train").tolist(), self.tk.encode_ordinary(text) + [EOT])
        run = letters + letters  # 14,000 letters: over MAX_PIECE_CHARS, encoded as the warning says
        (self.dir / "run.txt").write_text(run, encoding="utf-8")
        with mock.patch.object(data, "PIECE_CHARS", 2000), mock.patch.object(data, "MAX_PIECE_CHARS", 8000), \
                self.assertWarnsRegex(UserWarning, "document 0 holds a pre-token .* over 8,000 characters"):
            prepare_corpus(self.dir / "run.txt", self.dir / "run", val_fraction=0, num_workers=1, progress=False)
        expected = self.tk.encode_ordinary(run[:8000]) + self.tk.encode_ordinary(run[8000:]) + [EOT]
        self.assertEqual(tokens_of(self.dir / "run", "train").tolist(), expected)

    @process_level
    def test_killed_and_rerun_is_byte_identical(self):
        src, _ = self.make_folder()
        args = dict(val_fraction=0.3, shard_tokens=50, seed=1, progress=False)
        prepare_corpus(src, self.dir / "clean", num_workers=1, **args)
        # SIGKILL in the middle of the second train shard, right after some of its tokens hit the temporary file
        script = textwrap.dedent(f"""
            import os, signal, sys
            sys.path.insert(0, {str(ROOT)!r})
            import mygpt.data as data
            commit, append = data._ShardFile.commit, data._ShardFile.append
            def append_then_die(self, tokens):
                append(self, tokens)
                if self.path.name == "train_000001.bin" and self.count:
                    os.kill(os.getpid(), signal.SIGKILL)
            data._ShardFile.append = append_then_die
            data.prepare_corpus({str(src)!r}, {str(self.dir / "killed")!r}, num_workers=1, **{args!r})
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, -9, result.stderr)
        left = sorted(os.listdir(self.dir / "killed"))
        self.assertNotIn("meta.json", left)
        self.assertIn("train_000000.bin", left)
        self.assertNotIn("train_000001.bin", left)
        self.assertTrue(any(name.startswith("train_000001.bin.tmp-") for name in left), left)
        for name in left:  # whatever looks like a shard is a whole one
            if name.endswith(".bin"):
                read_header(self.dir / "killed" / name)
        prepare_corpus(src, self.dir / "killed", num_workers=2, **args)
        self.assertEqual(files_of(self.dir / "killed"), files_of(self.dir / "clean"))

    def run_prepare_that(self, action, out, args):
        """Run `mygpt prepare` in a new process whose worker encoding document 2 first does `action` (code using
        os and signal); returns the CompletedProcess, the time it took and whether it came back in 60 s."""
        script = textwrap.dedent(f"""
            import os, signal, sys
            sys.path.insert(0, {str(ROOT)!r})
            import mygpt.data as data
            from mygpt.cli import main
            encode_unit = data._encode_unit
            def encode_or_act(unit):
                if any(index == 2 for index, _, _ in unit):
                    {action}
                return encode_unit(unit)
            data._encode_unit, data.UNIT_CHARS = encode_or_act, 10  # a unit per document
            sys.exit(main(["prepare", *{args!r}, "--out", {str(out)!r}]))
        """)
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        return result, time.monotonic() - start

    @process_level
    def test_a_killed_worker_or_sigterm_ends_prepare_in_one_line(self):
        src, _ = self.make_folder()
        args = [str(src), "--val-fraction", "0.3", "--shard-tokens", "50", "--seed", "1", "--num-workers", "2"]
        prepare_corpus(src, self.dir / "clean", val_fraction=0.3, shard_tokens=50, seed=1, num_workers=1,
                       progress=False)
        for action, message in (("os.kill(os.getpid(), signal.SIGKILL)",  # as the OOM killer does
                                 r"encoding process \d+ was killed by SIGKILL .*run the same prepare again"),
                                ("os.kill(os.getppid(), signal.SIGTERM); import time; time.sleep(1)",
                                 "prepare was stopped by SIGTERM .*run the same prepare again")):
            out = self.dir / f"out-{len(message)}"
            with self.subTest(action):
                result, seconds = self.run_prepare_that(action, out, args)  # a hang raises TimeoutExpired
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertLess(seconds, 30)
                self.assertNotIn("Traceback", result.stderr)
                self.assertRegex(result.stderr.splitlines()[-1], "^mygpt: error: " + message)
                self.assertNotIn("meta.json", os.listdir(out))
                self.assertFalse([name for name in os.listdir(out) if ".tmp-" in name])
                prepare_corpus(src, out, val_fraction=0.3, shard_tokens=50, seed=1, num_workers=2, progress=False)
                self.assertEqual(files_of(out), files_of(self.dir / "clean"))

    def test_rerun_of_a_finished_corpus_and_foreign_folders(self):
        src, _ = self.make_folder()
        out = self.dir / "out"
        args = dict(val_fraction=0.3, seed=3, num_workers=1, progress=False)
        meta = prepare_corpus(src, out, shard_tokens=64, **args)
        stamp = (out / "train_000000.bin").stat().st_mtime_ns
        self.assertEqual(prepare_corpus(src, out, shard_tokens=64, **args), meta)
        self.assertEqual((out / "train_000000.bin").stat().st_mtime_ns, stamp)  # nothing rewritten
        with self.assertRaisesRegex(ValueError, "other settings"):
            prepare_corpus(src, out, shard_tokens=32, **args)
        (out / "train_000001.bin").unlink()  # a damaged corpus of the same settings is prepared again
        self.assertEqual(prepare_corpus(src, out, shard_tokens=64, **args), meta)
        self.assertTrue((out / "train_000001.bin").is_file())
        foreign = self.dir / "foreign"
        foreign.mkdir()
        write_shard(foreign / "train_000000.bin", [1, 2, 3])
        with self.assertRaisesRegex(ValueError, "did not record"):
            prepare_corpus(src, foreign, **args)

    @process_level
    def test_a_second_prepare_into_a_folder_in_use_is_refused(self):
        src, _ = self.make_folder()
        out = self.dir / "out"
        hold = "import sys, time; from mygpt import exclusive\nwith exclusive(sys.argv[1]):\n print(1, flush=True); time.sleep(60)"
        running = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
        try:
            running.stdout.readline()
            with self.assertRaisesRegex(InUseError, f"in use by process {running.pid} "):
                prepare_corpus(src, out, num_workers=1, val_fraction=0, progress=False)
            self.assertEqual(os.listdir(out), [])
        finally:
            running.kill()
            running.wait()
            running.stdout.close()
        prepare_corpus(src, out, num_workers=1, val_fraction=0, progress=False)  # once it has ended

    def test_changed_added_or_removed_sources_are_prepared_again(self):
        src, documents = self.make_folder()
        out = self.dir / "out"
        args = dict(val_fraction=0.3, seed=3, num_workers=1, progress=False)
        prepare_corpus(src, out, **args)
        (src / "a.txt").write_text("changed", encoding="utf-8")
        os.utime(src / "a.txt", ns=(1, 10**18))  # another size and time
        (src / "f.txt").write_text("added", encoding="utf-8")  # sorted last: document 8
        expected = self.reference(["changed", *documents[1:], "added"], 3, 0.3)
        with self.assertWarnsRegex(UserWarning, r"source files of .*out have changed .*\(5 files, .*now 6 files"):
            meta = prepare_corpus(src, out, **args)
        self.assertEqual(meta["source_files"]["files"], 6)
        for split in ("train", "val"):
            self.assertEqual(tokens_of(out, split).tolist(), expected[split])
        stamp = (out / "train_000000.bin").stat().st_mtime_ns
        self.assertEqual(prepare_corpus(src, out, **args), meta)  # nothing changed since: nothing rewritten
        self.assertEqual((out / "train_000000.bin").stat().st_mtime_ns, stamp)
        (src / "f.txt").unlink()
        with self.assertWarnsRegex(UserWarning, "now 5 files"):
            prepare_corpus(src, out, **args)
        self.assertEqual(tokens_of(out, "train").tolist(), self.reference(["changed", *documents[1:]], 3, 0.3)["train"])

    def test_readers_refuse_an_unfinished_corpus(self):
        (self.dir / "one.txt").write_text("a single document of some words", encoding="utf-8")
        out = self.dir / "out"
        prepare_corpus(self.dir / "one.txt", out, val_fraction=0, num_workers=1, progress=False)
        meta = (out / "meta.json").read_bytes()
        (out / "meta.json").rename(out / "prepare.json")  # as a rerun leaves it until it ends
        for evidence in ("prepare.json", "train_000001.bin.tmp-123-abcdef01"):  # or a killed run's temporary shard
            (out / "prepare.json").rename(out / evidence)
            with self.subTest(evidence), self.assertRaisesRegex(ValueError, f"{out} holds an unfinished corpus.*"
                                                                f"{evidence}.*run the same prepare again"):
                TokenDataset(str(out / "train_*.bin"), 4)
            (out / evidence).rename(out / "prepare.json")
        (out / "prepare.json").rename(out / "train_000001.bin.tmp-123-abcdef01")
        (out / "meta.json").write_bytes(meta)  # finished: the temporary file no longer says anything
        self.assertEqual(TokenDataset(str(out / "train_*.bin"), 4).vocab_size, 50257)

    def test_the_recorded_tokenizer_is_compared(self):
        docs = ["hello there", "the other one"]
        for i, doc in enumerate(docs):
            (self.dir / f"{i}.txt").write_text(doc, encoding="utf-8")
        chars = sorted(set("".join(docs)))
        prepare_corpus(str(self.dir / "*.txt"), self.dir / "chars", tokenizer=chars, val_fraction=0, num_workers=1,
                       progress=False)
        ds = TokenDataset(str(self.dir / "chars" / "train_*.bin"), 4)
        self.assertEqual(ds.tokenizer, {"type": "chars", "chars": chars, "eot": len(chars)})
        ds.check_tokenizer({"type": "chars", "chars": chars, "eot": len(chars)})  # a checkpoint's record
        same_size = chars[:-1] + ["z"]
        for other in (same_size, {"type": "chars", "chars": chars}, "gpt2"):  # no eot: one token fewer
            with self.subTest(other), self.assertRaisesRegex(ValueError, f"shards {self.dir / 'chars'} were prepared "
                                                                         f"with another tokenizer .*chars .*meta.json"):
                ds.check_tokenizer(other)
        texts = [mixed_text(2000, seed=s).replace("\r", "") for s in range(2)]
        first, second = train_bpe(texts[:1], vocab_size=300), train_bpe(texts[1:], vocab_size=300)
        prepare_corpus(str(self.dir / "*.txt"), self.dir / "bpe", tokenizer=first, val_fraction=0, num_workers=1,
                       progress=False)
        ds = TokenDataset(str(self.dir / "bpe" / "train_*.bin"), 4)
        ds.check_tokenizer(first)
        with self.assertRaisesRegex(ValueError, "another tokenizer .*bpe .*300 tokens.*bpe .*300 tokens"):
            ds.check_tokenizer(second)  # the same size: only the recorded sha256 tells them apart
        prepare_corpus(str(self.dir / "*.txt"), self.dir / "gpt2", val_fraction=0, num_workers=1, progress=False)
        ds = TokenDataset(str(self.dir / "gpt2" / "train_*.bin"), 4)
        ds.check_tokenizer({"type": "gpt2"})
        ds.check_tokenizer(Encoder(get_encoder().encoder, get_encoder().merges))  # a copy of GPT-2's vocabulary
        with self.assertRaisesRegex(ValueError, "another tokenizer"):
            ds.check_tokenizer(first)
        numpy_shard(self.dir / "llmc.bin", np.arange(10))  # shards without meta.json record nothing to compare
        TokenDataset(self.dir / "llmc.bin", 4).check_tokenizer(first)

    def test_an_older_meta_json_still_reads(self):
        """meta.json as mygpt wrote it before its tokenizer record was the checkpoints' one: a name and the sha256
        of the vocabulary (of the characters joined; of the files Encoder.save writes)."""
        docs = ["hello there", "the other one"]
        for i, doc in enumerate(docs):
            (self.dir / f"{i}.txt").write_text(doc, encoding="utf-8")
        chars = sorted(set("".join(docs)))
        trained, other = (train_bpe([mixed_text(2000, seed=s)], vocab_size=300) for s in range(2))
        trained.save(self.dir / "vocab")
        hashes = {name: hashlib.sha256((self.dir / "vocab" / name).read_bytes()).hexdigest()
                  for name in ("encoder.json", "vocab.bpe")}
        older = {  # tokenizer given to prepare, a checkpoint's record of it, what meta.json recorded then
            "chars": (chars, {"type": "chars", "chars": chars, "eot": len(chars)},
                      {"name": "chars", "chars": "".join(chars),
                       "sha256": hashlib.sha256("".join(chars).encode()).hexdigest()}),
            "gpt2": ("gpt2", {"type": "gpt2"}, {"name": "gpt2", "sha256": {
                "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}}),
            "bpe": (trained, describe_tokenizer(trained), {"name": "bpe", "sha256": hashes})}
        for name, (tokenizer, checkpoint_record, record) in older.items():
            with self.subTest(name):
                out = self.dir / name
                prepare_corpus(str(self.dir / "*.txt"), out, tokenizer=tokenizer, val_fraction=0, num_workers=1,
                               progress=False)
                meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
                meta["settings"]["tokenizer"] = record
                (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
                ds = TokenDataset(str(out / "train_*.bin"), 4)
                self.assertEqual(ds.tokenizer, record)
                ds.check_tokenizer(checkpoint_record)
                with self.assertRaisesRegex(ValueError, "prepared with another tokenizer"):
                    ds.check_tokenizer(other)
                if name == "bpe":  # the hashes alone cannot give the vocabulary back
                    with self.assertRaisesRegex(ValueError, r"sha256 of a trained BPE.*get_encoder\(folder\)"):
                        load_tokenizer(ds.tokenizer)
                else:
                    expected = [chars.index(c) for c in docs[1]] if name == "chars" else self.tk.encode_ordinary(docs[1])
                    self.assertEqual(load_tokenizer(ds.tokenizer).encode_ordinary(docs[1]), expected)
                # the same prepare again: the corpus is finished, with the same settings
                self.assertEqual(prepare_corpus(str(self.dir / "*.txt"), out, tokenizer=tokenizer, val_fraction=0,
                                                num_workers=1, progress=False), meta)

    def test_warns_when_a_split_gets_no_document(self):
        (self.dir / "one.jsonl").write_text('{"text": "a single document"}\n', encoding="utf-8")
        self.assertFalse(is_val(0, 0, 0.1))
        with self.assertWarnsRegex(UserWarning, "no document went to the val split.*1 documents were read"):
            prepare_corpus(self.dir / "one.jsonl", self.dir / "out", val_fraction=0.1, num_workers=1, progress=False)

    def test_a_finished_prepare_lets_its_workers_exit_instead_of_signalling_them(self):
        # terminate()'s SIGTERM is lost by a worker still being forked (Python clears pending signals after a fork),
        # and pool.join() then waits forever: a short corpus ends that soon after the pool starts
        codes, exit_pool = [], data._EncoderPool.__exit__

        def recording_exit(pool, *exc):
            exit_pool(pool, *exc)
            codes.extend(process.exitcode for process in pool.processes)

        (self.dir / "book.txt").write_text("to be or not to be\n" * 50, encoding="utf-8")
        with mock.patch.object(data._EncoderPool, "__exit__", recording_exit):
            prepare_corpus(self.dir / "book.txt", self.dir / "out", num_workers=2, progress=False)
        self.assertEqual(codes, [0, 0])

    def test_one_text_file_is_cut_by_characters_as_nanogpt_cuts_it(self):
        text = "".join(f"line {i}: to be or not to be\n" for i in range(300))
        (self.dir / "book.txt").write_text(text, encoding="utf-8")
        enc = get_encoder()
        for val_fraction, workers in ((None, 1), (0.25, 2)):
            with self.subTest(val_fraction=val_fraction):
                out = self.dir / f"out{workers}"
                meta = prepare_corpus(self.dir / "book.txt", out, val_fraction=val_fraction, num_workers=workers,
                                      progress=False)
                cut = int(len(text) * (1 - (val_fraction or 0.1)))  # nanoGPT's 90/10 by default
                self.assertEqual(tokens_of(out, "train").tolist(), enc.encode_ordinary(text[:cut]) + [50256])
                self.assertEqual(tokens_of(out, "val").tolist(), enc.encode_ordinary(text[cut:]) + [50256])
                self.assertEqual((meta["train"]["documents"], meta["val"]["documents"]), (1, 1))
                self.assertEqual(meta["settings"]["split"], "characters")

    def test_no_text_is_an_error_and_a_mistyped_path_no_dataset_name(self):
        (self.dir / "empty.txt").write_text("", encoding="utf-8")
        with self.assertRaisesRegex(ValueError, "empty.txt: no text to prepare"):
            prepare_corpus(self.dir / "empty.txt", self.dir / "out", num_workers=1, progress=False)
        self.assertFalse((self.dir / "out").exists())  # nothing left behind
        (self.dir / "data").mkdir()
        for typo in ("data/book.txtt", str(self.dir / "data" / "book"), "notes.md", "./book", "~/book"):
            with self.subTest(typo), self.assertRaisesRegex(FileNotFoundError, f"source '{re.escape(typo)}' is not "
                                                                              f"a file or folder"):
                prepare_corpus(typo, self.dir / "out", num_workers=1, progress=False)

    def test_character_vocabulary(self):
        docs = ["hello there", "", "the other one\n"]
        for i, doc in enumerate(docs):
            (self.dir / f"{i}.txt").write_text(doc, encoding="utf-8")
        chars = sorted(set("".join(docs)))
        meta = prepare_corpus(str(self.dir / "*.txt"), self.dir / "out", tokenizer=chars, val_fraction=0,
                              num_workers=1, progress=False)
        expected = [chars.index(c) for c in docs[0]] + [len(chars)] + [chars.index(c) for c in docs[2]] + [len(chars)]
        self.assertEqual(tokens_of(self.dir / "out", "train").tolist(), expected)
        self.assertEqual((meta["vocab_size"], meta["eot"]), (len(chars) + 1, len(chars)))
        self.assertEqual(meta["settings"]["tokenizer"], {"type": "chars", "chars": chars, "eot": len(chars)})
        with self.assertRaisesRegex(ValueError, r"document 2: character 'n'"):
            prepare_corpus(str(self.dir / "*.txt"), self.dir / "out2", tokenizer=list("helo tr"), num_workers=1,
                           val_fraction=0, progress=False)

    def test_large_character_vocabulary_gives_uint32_shards(self):
        chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
        text = "".join(chars[-5:] + chars[:3])
        (self.dir / "t.txt").write_text(text, encoding="utf-8")
        meta = prepare_corpus(self.dir / "t.txt", self.dir / "out", tokenizer=chars, val_fraction=0, num_workers=1,
                              progress=False)
        self.assertEqual((meta["dtype"], meta["magic"], meta["version"]), ("uint32", 20240801, 7))
        ds = TokenDataset(self.dir / "out" / "train_000000.bin", block_size=8)
        self.assertEqual(ds[0][1].tolist(), [chars.index(c) for c in text[1:]] + [len(chars)])

    def test_custom_encoder(self):
        docs = [mixed_text(2000, seed=s).replace("\r", "") for s in range(3)]  # as text files read back
        encoder = train_bpe(docs, vocab_size=400)
        for i, doc in enumerate(docs):
            (self.dir / f"{i}.txt").write_text(doc, encoding="utf-8")
        meta = prepare_corpus(str(self.dir / "*.txt"), self.dir / "out", tokenizer=encoder, val_fraction=0,
                              num_workers=1, progress=False)
        eot = encoder.special_tokens[ENDOFTEXT]
        expected = self.reference(docs, 0, 0, encode=encoder.encode_ordinary, eot=eot)["train"]
        self.assertEqual(tokens_of(self.dir / "out", "train").tolist(), expected)
        self.assertEqual((meta["vocab_size"], meta["eot"]), (400, eot))
        self.assertEqual(meta["settings"]["tokenizer"], describe_tokenizer(encoder))  # the whole vocabulary
        self.assertEqual(load_tokenizer(meta["settings"]["tokenizer"]).encode_ordinary(docs[0]),
                         encoder.encode_ordinary(docs[0]))
        with self.assertRaisesRegex(ValueError, "no <\\|endoftext\\|> token"):
            prepare_corpus(self.dir / "0.txt", self.dir / "o2", tokenizer=train_bpe(docs, 300, special_tokens=()))

    def test_parquet(self):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            self.skipTest("pyarrow is not installed (pip install 'mygpt[data]')")
        docs = ["parquet row one", None, "ряд два 🙂", "three"]
        pq.write_table(pa.table({"content": docs, "n": [1, 2, 3, 4]}), self.dir / "d.parquet", row_group_size=2)
        prepare_corpus(self.dir / "d.parquet", self.dir / "out", text_field="content", val_fraction=0,
                       num_workers=1, progress=False)
        expected = self.reference([d or "" for d in docs], 0, 0)["train"]
        self.assertEqual(tokens_of(self.dir / "out", "train").tolist(), expected)
        with self.assertRaisesRegex(ValueError, "no column 'text'"):
            prepare_corpus(self.dir / "d.parquet", self.dir / "out2", num_workers=1, progress=False)

    def test_hugging_face_dataset(self):
        try:
            import datasets  # noqa: F401
        except ImportError:
            self.skipTest("datasets is not installed (pip install 'mygpt[data]')")
        docs = [f"row {i}: some text" for i in range(20)]
        jsonl = self.dir / "rows.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        spec = {"path": "json", "data_files": str(jsonl)}  # a packaged builder: offline, no dataset script
        with mock.patch.dict(os.environ, {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}):
            prepare_corpus(spec, self.dir / "out", val_fraction=0.2, num_workers=1, progress=False)
        expected = self.reference(docs, 0, 0.2)
        self.assertEqual(tokens_of(self.dir / "out", "val").tolist(), expected["val"])
        self.assertEqual(tokens_of(self.dir / "out", "train").tolist(), expected["train"])

    def test_missing_extra_is_named(self):
        with mock.patch.dict(sys.modules, {"datasets": None, "pyarrow": None, "pyarrow.parquet": None}):
            with self.assertRaisesRegex(ImportError, r"pip install 'mygpt\[data\]'"):
                prepare_corpus("someone/some-dataset", self.dir / "out", num_workers=1, progress=False)
            (self.dir / "d.parquet").write_bytes(b"PAR1")
            with self.assertRaisesRegex(ImportError, r"pip install 'mygpt\[data\]'"):
                prepare_corpus(self.dir / "d.parquet", self.dir / "out2", num_workers=1, progress=False)

    def test_bad_input(self):
        src, _ = self.make_folder()
        out = self.dir / "out"
        for kwargs, error, message in (
                ({"tokenizer": "gpt4"}, ValueError, "list of characters"),
                ({"tokenizer": ["ab"]}, ValueError, "single characters"),
                ({"tokenizer": 5}, TypeError, "tokenizer"),
                ({"val_fraction": 1.0}, ValueError, "val_fraction"),
                ({"shard_tokens": 2**31}, ValueError, "shard_tokens"),
                ({"num_workers": 0}, ValueError, "num_workers")):
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(error, message):
                prepare_corpus(src, out, progress=False, **kwargs)
        with self.assertRaisesRegex(ValueError, "does not run dataset scripts"):
            prepare_corpus({"path": "some/dataset", "trust_remote_code": True}, out, progress=False)
        with self.assertRaisesRegex(FileNotFoundError, "nowhere.txt"):
            prepare_corpus(self.dir / "nowhere.txt", out, progress=False)
        (self.dir / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
        with self.assertRaisesRegex(ValueError, r"bad.jsonl:2 has no 'text' field"):
            prepare_corpus(self.dir / "bad.jsonl", self.dir / "o1", num_workers=1, progress=False)
        with self.assertRaisesRegex(ValueError, r"\.hidden\.txt is not UTF-8"):
            prepare_corpus(src / ".hidden.txt", self.dir / "o2", num_workers=1, progress=False)
        self.assertFalse(any((self.dir / "o2").glob("*.bin*")))  # a failed run leaves no shard or temporary file


if __name__ == "__main__":
    unittest.main()
