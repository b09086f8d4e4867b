"""prepare_corpus against tiktoken and documents encoded one by one: the split, the cuts, the workers, interruptions,
reruns and every kind of source."""

import hashlib
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

import mygpt.prepare as prepare
import mygpt.workers
from mygpt.bpe import ENDOFTEXT, Encoder, get_encoder
from mygpt.bpe_train import train_bpe
from mygpt.data import TokenDataset, read_header, write_shard
from mygpt.prepare import prepare_corpus
from mygpt.tokenizer import describe_tokenizer, load_tokenizer
from mygpt.utils import InUseError
from tests.corpus import mixed_text
from tests.helpers import process_level
from tests.test_bpe import tiktoken_gpt2
from tests.test_data import TempDir, numpy_shard

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


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


def start_then_sleep(started):
    started.set()
    time.sleep(30)


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
        with mock.patch.object(prepare, "_UNIT_CHARS", 100):  # many work units in flight between the processes
            prepare_corpus(src, self.dir / "out3", val_fraction=0.3, seed=3, shard_tokens=64, num_workers=2,
                           progress=False)
        self.assertTrue(any((self.dir / "out1").glob("val_*.bin")))
        self.assertEqual(files_of(self.dir / "out1"), files_of(self.dir / "out2"))
        self.assertEqual(files_of(self.dir / "out1"), files_of(self.dir / "out3"))

    def test_long_documents_are_cut_where_tokens_do_not_change(self):
        text = mixed_text(40_000, seed=5)
        (self.dir / "long.txt").write_text(text, encoding="utf-8", newline="")
        with mock.patch.object(prepare, "_PIECE_CHARS", 2000), mock.patch.object(prepare, "_UNIT_CHARS", 3000):
            prepare_corpus(self.dir / "long.txt", self.dir / "out", val_fraction=0, num_workers=2, progress=False)
        read = (self.dir / "long.txt").read_text(encoding="utf-8")  # "\r\n" as "\n", also across blocks
        self.assertEqual(tokens_of(self.dir / "out", "train").tolist(), self.tk.encode_ordinary(read) + [EOT])

    def test_cuts_keep_tiktoken_ids_wherever_they_fall(self):
        # every kind of neighbour a cut may have: letters (contractions' too), digits, symbols, apostrophes, spaces
        alphabet = [*"abstrvmldSé", *"019٣", *"'-!.", " ", "\n", "\t", "\u00a0", "\u3000"]
        text = "".join(random.Random(0).choices(alphabet, k=20_000))
        blocks = (text[i:i + 1000] for i in range(0, len(text), 1000))
        with mock.patch.object(prepare, "_PIECE_CHARS", 40):
            pieces = [piece for piece, _ in prepare._pieces(blocks, prepare._cut_gpt2, 0)]
        self.assertGreater(len(pieces), 500)
        self.assertEqual("".join(pieces), text)
        self.assertEqual([i for p in pieces for i in self.tk.encode_ordinary(p)], self.tk.encode_ordinary(text))

    def test_documents_without_spaces_equal_tiktoken_and_overlong_runs_are_named(self):
        rng = random.Random(1)
        letters = "".join(rng.choices("ACGT", k=7000))  # one pre-token longer than a piece
        base64 = "".join(rng.choices("abcXYZ0189+/=", k=9000))  # no space, but letters, digits and symbols meet
        for name, text in (("letters", letters), ("base64", base64), ("both", letters + "7" + base64)):
            (self.dir / f"{name}.txt").write_text(text, encoding="utf-8")
            with self.subTest(name), mock.patch.object(prepare, "_PIECE_CHARS", 2000), \
                    mock.patch.object(prepare, "_MAX_PIECE_CHARS", 8000):
                prepare_corpus(self.dir / f"{name}.txt", self.dir / name, val_fraction=0, num_workers=1,
                               progress=False)
                self.assertEqual(tokens_of(self.dir / name, "train").tolist(), self.tk.encode_ordinary(text) + [EOT])
        run = letters + letters  # 14,000 letters: over _MAX_PIECE_CHARS, encoded as the warning says
        (self.dir / "run.txt").write_text(run, encoding="utf-8")
        with mock.patch.object(prepare, "_PIECE_CHARS", 2000), mock.patch.object(prepare, "_MAX_PIECE_CHARS", 8000), \
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
            import mygpt.prepare as prepare
            commit, append = data._ShardFile.commit, data._ShardFile.append
            def append_then_die(self, tokens):
                append(self, tokens)
                if self.path.name == "train_000001.bin" and self.count:
                    os.kill(os.getpid(), signal.SIGKILL)
            data._ShardFile.append = append_then_die
            prepare.prepare_corpus({str(src)!r}, {str(self.dir / "killed")!r}, num_workers=1, **{args!r})
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
            import mygpt.prepare as prepare
            from mygpt.cli import main
            encode_unit = prepare._encode_unit
            def encode_or_act(state, unit):
                if any(index == 2 for index, _, _ in unit):
                    {action}
                return encode_unit(state, unit)
            prepare._encode_unit, prepare._UNIT_CHARS = encode_or_act, 10  # a unit per document
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

    def test_a_worker_that_inherits_the_sigterm_handler_ends_quietly(self):
        # a worker process forked, and sent SIGTERM by the ending pool, before it sets its own handler
        context = multiprocessing.get_context("fork")
        with prepare._sigterm_raises():
            started = context.Event()
            worker = context.Process(target=start_then_sleep, args=(started,))
            worker.start()
            self.assertTrue(started.wait(30))
            os.kill(worker.pid, signal.SIGTERM)
            worker.join(30)
        self.assertEqual(worker.exitcode, -signal.SIGTERM)  # not 1, from an InterruptedError's traceback

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
        processes, in_order = [], mygpt.workers._in_order

        def recording_in_order(pool, pool_processes, *args):
            processes.extend(pool_processes)
            return in_order(pool, pool_processes, *args)

        (self.dir / "book.txt").write_text("to be or not to be\n" * 50, encoding="utf-8")
        with mock.patch.object(mygpt.workers, "_in_order", recording_in_order):
            prepare_corpus(self.dir / "book.txt", self.dir / "out", num_workers=2, progress=False)
        self.assertEqual([process.exitcode for process in processes], [0, 0])

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
