"""Token shards in llm.c's layout, and TokenDataset against plain numpy slicing (prepare_corpus: test_prepare.py)."""

import json
import os
import pickle
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.data import DataLoader

from mygpt.data import ShardError, TokenDataset, read_header, write_shard


def numpy_shard(path, tokens, magic=20240520, version=1, count=None, dtype="<u2"):
    """A shard as llm.c's own writer makes it, by plain numpy: 256 int32 header, then the tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        header.tofile(f)
        np.asarray(tokens, dtype=dtype).tofile(f)


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


if __name__ == "__main__":
    unittest.main()
