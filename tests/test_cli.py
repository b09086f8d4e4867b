"""The `mygpt` command, run in-process through main() on tiny checkpoints that the Trainer writes here."""

import contextlib
import importlib.util
import io
import json
import math
import os
import stat
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mygpt.checkpoint import save_checkpoint
from mygpt.cli import main
from mygpt.inference import precision_context
from mygpt.data import write_shard
from mygpt.prepare import prepare_corpus
from mygpt.model import GPT
from mygpt.quantize import load_quantized
from mygpt.bpe_train import train_bpe
from mygpt.tokenizer import describe_tokenizer, load_tokenizer
from mygpt.trainer import Trainer
from tests.helpers import process_level
from tests.test_compiled import NO_COMPILER, failing_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHINESE = "你好世界。"  # every character of it spans two GPT-2 tokens
CHARS = {"type": "chars", "chars": list("ehlo "), "eot": 5}


class Windows(Dataset):
    """Every window of block_size + 1 tokens of one sequence, as (input, target) pairs."""

    def __init__(self, ids, block_size):
        self.ids, self.block_size = torch.tensor(ids), block_size

    def __len__(self):
        return len(self.ids) - self.block_size

    def __getitem__(self, i):
        chunk = self.ids[i:i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def train(path, tokenizer, text, vocab_size, n_embd, iters, eot=None):
    """A tiny GPT trained on `text` repeated (documents ended by eot), saved by the Trainer at path."""
    torch.manual_seed(0)
    tok = load_tokenizer(tokenizer)
    ids = (tok.encode(text) + ([eot] if eot is not None else [])) * 40
    config = GPT.get_default_config()
    config.merge_from_dict(dict(n_layer=1, n_head=2, n_embd=n_embd, vocab_size=vocab_size, block_size=16))
    model = GPT(config)
    C = Trainer.get_default_config()
    C.merge_from_dict(dict(device="cpu", max_iters=iters, batch_size=8, learning_rate=3e-2, quiet=True,
                           log_interval=0, eval_interval=iters, eval_iters=2, ckpt_path=path))
    trainer = Trainer(C, model, Windows(ids, 16), Windows(ids, 16), tokenizer=tokenizer)
    trainer.run()
    return trainer


def missing(*modules):
    return any(importlib.util.find_spec(m) is None for m in modules)


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def load_model(path, int8_layers="auto"):
    """The model of a Trainer's checkpoint or of a quantized one."""
    ckpt = torch.load(path, weights_only=True)
    if ckpt.get("format") == "mygpt-int8":
        return load_quantized(path, layers=int8_layers)
    return GPT.from_checkpoint(path)


def run(*argv):
    """(exit status, stdout, stderr) of `mygpt argv`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def setUpModule():
    """Two checkpoints for every test: GPT-2 BPE (vocab 50257, tiny width) and characters with <|endoftext|>."""
    torch.set_num_threads(1)
    CLITest.dir = tempfile.mkdtemp()
    CLITest.gpt2 = os.path.join(CLITest.dir, "gpt2.pt")
    CLITest.chars = os.path.join(CLITest.dir, "chars.pt")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        CLITest.gpt2_trainer = train(CLITest.gpt2, {"type": "gpt2"}, CHINESE, 50257, n_embd=16, iters=20)
        CLITest.chars_trainer = train(CLITest.chars, CHARS, "hello", 6, n_embd=16, iters=60, eot=5)


def tearDownModule():
    shutil.rmtree(CLITest.dir)


class CLITest(unittest.TestCase):
    def path(self, name):
        return os.path.join(self.dir, name)

    def assertFails(self, argv, status, message):
        code, out, err = run(*argv)
        self.assertEqual(code, status, err)
        self.assertEqual(err.count("\n"), 1, f"one line expected: {err!r}")
        self.assertTrue(err.startswith("mygpt: error: "), err)
        self.assertRegex(err, message)
        self.assertNotIn("Traceback", err)


class TestSample(CLITest):
    def expected(self, path, prompt, seed, n, stop=True, int8_layers="auto", **kwargs):
        """What model.generate gives for the same settings, decoded, without the stop token."""
        model = load_model(path, int8_layers)
        tok = load_tokenizer(torch.load(path, weights_only=True)["tokenizer"])
        generator = torch.Generator().manual_seed(seed)
        texts = []
        for _ in range(n):
            out = model.generate(torch.tensor([tok.encode(prompt)]), 12, generator=generator,
                                 stop_tokens=[tok.eot_token] if stop else None, **kwargs)[0].tolist()
            texts.append(tok.decode(out[:-1] if stop and out[-1] == tok.eot_token else out))
        return texts

    def test_sampled_text_is_what_generate_returns(self):
        for path, prompt in ((self.gpt2, CHINESE[:2]), (self.chars, "he")):
            with self.subTest(path=os.path.basename(path)):
                status, out, err = run("sample", path, "--prompt", prompt, "--seed", 7, "--num-samples", 3,
                                       "--max-new-tokens", 12, "--top-k", 4, "--top-p", 0.9, "--temperature", 1.5,
                                       "--precision", "fp32")  # the reference is fp32: auto may take bf16
                self.assertEqual(status, 0, err)
                expected = self.expected(path, prompt, 7, 3, do_sample=True, top_k=4, top_p=0.9, temperature=1.5)
                self.assertEqual(out, "\n----------------------------------------\n".join(expected) + "\n")

    def test_precision_reaches_sampling(self):
        expected = self.expected(self.chars, "he", 3, 1, do_sample=True)[0] + "\n"
        for precision in ("fp32", "auto"):  # auto: fp32 on this tiny model, whose weights are all small
            with patch("mygpt.cli.precision_context", wraps=precision_context) as context:
                status, out, err = run("sample", self.chars, "--prompt", "he", "--seed", 3, "--max-new-tokens", 12,
                                       "--precision", precision)
            self.assertEqual((status, out), (0, expected), err)
            self.assertEqual(context.call_args.args[0], "fp32")
        with patch("mygpt.cli.precision_context", wraps=precision_context) as context:
            self.assertEqual(run("sample", self.chars, "--max-new-tokens", 4, "--precision", "bf16")[0], 0)
        self.assertEqual(context.call_args.args[0], "bf16")
        self.assertFails(["sample", self.chars, "--precision", "fp16"], 2, "invalid choice: 'fp16'")
        # GPT-2's vocabulary makes the head large enough to time: the timed choice is printed, once
        with patch("mygpt.precision.native", return_value=True), patch("mygpt.precision._probe", return_value=(2, 1)):
            status, out, err = run("sample", self.gpt2, "--max-new-tokens", 2)
        self.assertEqual(status, 0, err)
        notes = [line for line in err.splitlines() if line.startswith("mygpt:")]  # not torch's own warnings
        self.assertEqual(len(notes), 1, err)
        self.assertRegex(notes[0], r"^mygpt: precision='auto': bf16 \(bf16 autocast ran a step 2.00x as fast")
        quantized = self.path("chars-int8-precision.pt")
        self.assertEqual(run("quantize", self.chars, "--out", quantized)[0], 0)
        with open(self.path("precision.txt"), "w", encoding="utf-8") as f:
            f.write("hello " * 20)  # the checkpoint's five characters
        for command in (["sample", quantized], ["eval", quantized, "--data", self.path("precision.txt")]):
            self.assertFails([*command, "--precision", "bf16"], 1, "precision 'bf16' is for fp32 models")

    def test_greedy_stops_at_endoftext_unless_told_not_to(self):
        status, out, _ = run("sample", self.chars, "--prompt", "hel", "--greedy", "--max-new-tokens", 12)
        self.assertEqual(status, 0)
        self.assertEqual(out, "hello\n")  # the model learned "hello" then <|endoftext|>
        self.assertEqual(out, self.expected(self.chars, "hel", 0, 1)[0] + "\n")
        status, out, _ = run("sample", self.chars, "--prompt", "hel", "--greedy", "--max-new-tokens", 12, "--no-stop")
        self.assertEqual(out, self.expected(self.chars, "hel", 0, 1, stop=False)[0] + "\n")
        self.assertTrue(out.startswith("hello<|endoftext|>"), out)

    def test_a_failing_compile_is_one_line_and_eager_mode(self):
        with patch("mygpt.compiled._BACKEND", failing_backend):
            status, out, err = run("sample", self.chars, "--prompt", "hel", "--greedy", "--max-new-tokens", 12,
                                   "--compile")
        self.assertEqual((status, out), (0, "hello\n"))
        self.assertEqual(err, f"warning: torch.compile could not compile the decode step (RuntimeError: {NO_COMPILER}); "
                              f"running it in eager mode\n")

    def test_empty_prompt_starts_at_endoftext(self):
        status, out, _ = run("sample", self.chars, "--greedy", "--max-new-tokens", 12)
        self.assertEqual((status, out), (0, "hello\n"))

    def test_streams_whole_characters_when_tokens_split_them(self):
        writes = []

        class Recorder(io.StringIO):
            def write(self, text):
                writes.append(text)
                return super().write(text)

        with contextlib.redirect_stdout(Recorder()), contextlib.redirect_stderr(io.StringIO()):
            status = main(["sample", self.gpt2, "--prompt", CHINESE[:2], "--greedy", "--max-new-tokens", "12",
                           "--precision", "fp32"])
        self.assertEqual(status, 0)
        # printing each token's own text would turn every half character into U+FFFD and differ from this
        self.assertEqual("".join(writes), self.expected(self.gpt2, CHINESE[:2], 0, 1, stop=False)[0] + "\n")
        model, tok = GPT.from_checkpoint(self.gpt2), load_tokenizer({"type": "gpt2"})
        new = model.generate(torch.tensor([tok.encode(CHINESE[:2])]), 12)[0, 4:].tolist()
        halves = [t for t in new if not is_utf8(tok.decode_bytes([t]))]
        self.assertGreater(len(halves), 2, "the test needs tokens that end inside a character")
        self.assertGreater(sum(1 for w in writes if w.strip()), 4)  # printed as it went

    def test_errors(self):
        with open(self.path("corrupt.pt"), "wb") as f:
            f.write(b"not a checkpoint" * 100)
        self.assertFails(["sample", self.path("missing.pt"), "--prompt", "x"], 1, "no checkpoint at .*missing.pt")
        self.assertFails(["sample", self.path("corrupt.pt"), "--prompt", "x"], 1, "damaged or not a torch checkpoint")
        self.assertFails(["sample", self.chars, "--prompt", "hex!"], 1,
                         r"--prompt: .*characters outside .*: '!', 'x'")
        self.assertFails(["sample", self.chars, "--bogus"], 2, r"unrecognized arguments: --bogus .*mygpt sample --help")
        self.assertFails(["sample", self.chars, "--top-p", "1.5"], 2, r"--top-p: must be in \(0, 1\]")
        self.assertFails(["sample", self.chars, "--max-new-tokens", "x"], 2, "--max-new-tokens: must be an integer")
        self.assertFails(["sample"], 2, "required: CKPT")
        self.assertFails(["frobnicate"], 2, "invalid choice: 'frobnicate'")

    def test_values_torch_cannot_take_are_refused_as_usage_errors(self):
        # each was a traceback from inside torch: softmax of inf, a seed beyond 64 bits, cuda on a CPU build
        self.assertFails(["sample", self.chars, "--temperature", "1e-45"], 2, "--temperature: must be at least 1e-06.*"
                                                                              "--greedy")
        self.assertFails(["sample", self.chars, "--seed", "99999999999999999999999"], 2,
                         r"--seed: must be an integer from 0 to 2\*\*64 - 1")
        self.assertFails(["sample", self.chars, "--seed", "-1"], 2, "--seed: must be an integer from 0")
        self.assertFails(["sample", self.chars, "--device", "gpu"], 1, "--device='gpu' is not a device")
        if not torch.cuda.is_available():
            self.assertFails(["sample", self.chars, "--device", "cuda"], 1, "--device=cuda: this .*(without CUDA|GPU)")
        status, out, err = run("sample", self.chars, "--prompt", "he", "--temperature", "1e-6", "--max-new-tokens", 3)
        self.assertEqual(status, 0, err)


class TestEval(CLITest):
    def reference(self, path, text=None, max_windows=None, ids=None):
        """(mean loss, bits per byte) by hand: windows [i, i + T] for i = 0, T, 2T, ..., each token after the first
        predicted once; bytes are the UTF-8 bytes of the predicted tokens."""
        model = load_model(path)
        tok = load_tokenizer(torch.load(path, weights_only=True)["tokenizer"])
        ids = tok.encode(text) if ids is None else ids
        T = model.block_size
        nats, count, nbytes = 0.0, 0, 0
        starts = list(range(0, len(ids) - 1, T))[:max_windows]
        for start in starts:
            x, y = torch.tensor(ids[start:start + T]), torch.tensor(ids[start + 1:start + T + 1])
            with torch.no_grad():
                logits, _ = model(x[None, :len(y)])
            nats += F.cross_entropy(logits[0], y, reduction="sum").item()
            count += len(y)
            nbytes += len(tok.decode_bytes(y.tolist()))
        if text is not None and max_windows is None:  # every token but the first was predicted
            self.assertEqual(nbytes, len(text.encode("utf-8")) - len(tok.decode_bytes(ids[:1])))
        return nats / count, nats / math.log(2) / nbytes

    def figures(self, out):
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        return float(lines["loss"]), float(lines["perplexity"]), float(lines["bits per byte"])

    def test_text_file_matches_a_hand_computation(self):
        text = "hello hello hell oh hole " * 5 + "he"  # 127 characters: the last window is short
        with open(self.path("eval.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        for extra, windows in ((("--batch-size", 2), None), (("--batch-size", 2, "--max-batches", 2), 4),
                               (("--max-batches", 1), 8)):  # batches of 8 when --batch-size is left out
            with self.subTest(extra=extra):
                status, out, err = run("eval", self.chars, "--data", self.path("eval.txt"), *extra)
                self.assertEqual(status, 0, err)
                loss, perplexity, bpb = self.figures(out)
                ref_loss, ref_bpb = self.reference(self.chars, text, windows)
                self.assertAlmostEqual(loss, ref_loss, places=5)
                self.assertAlmostEqual(perplexity, math.exp(ref_loss), places=3)
                self.assertAlmostEqual(bpb, ref_bpb, places=5)

    def test_bits_per_byte_counts_utf8_bytes(self):
        text = CHINESE * 6 + " end"  # 3 bytes per character: bits per byte is a third of bits per character
        with open(self.path("chinese.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        status, out, err = run("eval", self.gpt2, "--data", self.path("chinese.txt"), "--precision", "fp32")
        self.assertEqual(status, 0, err)
        loss, _, bpb = self.figures(out)
        ref_loss, ref_bpb = self.reference(self.gpt2, text)
        self.assertAlmostEqual(loss, ref_loss, places=5)
        self.assertAlmostEqual(bpb, ref_bpb, places=5)

    def test_shards_match_a_hand_computation(self):
        documents = self.prepare_hello()
        ids = np.fromfile(os.path.join(documents, "val_000000.bin"), dtype="<u2", offset=1024).tolist()
        full_windows = (len(ids) - 1) // 16  # a corpus's windows are whole, as TokenDataset serves them
        status, out, err = run("eval", self.chars, "--data", documents)
        self.assertEqual(status, 0, err)
        loss, _, bpb = self.figures(out)
        ref_loss, ref_bpb = self.reference(self.chars, ids=ids, max_windows=full_windows)
        self.assertAlmostEqual(loss, ref_loss, places=5)
        self.assertAlmostEqual(bpb, ref_bpb, places=5)
        self.assertFails(["eval", self.gpt2, "--data", documents], 1,
                         "prepared with another tokenizer than the checkpoint's .*6 tokens.*50257 tokens")

    def prepare_hello(self):
        """A character corpus (the checkpoint's vocabulary) prepared by mygpt prepare; returns its folder."""
        folder = self.path("hello-corpus")
        if not os.path.isdir(folder):
            with open(self.path("docs.jsonl"), "w", encoding="utf-8") as f:
                for i in range(40):
                    f.write(json.dumps({"text": "hello " * (i % 5) + "hole"}) + "\n")
            with open(self.path("chars.json"), "w", encoding="utf-8") as f:
                json.dump(CHARS["chars"], f)
            status, _, err = run("prepare", self.path("docs.jsonl"), "--out", folder, "--tokenizer",
                                 self.path("chars.json"), "--val-fraction", 0.5, "--num-workers", 1)
            self.assertEqual(status, 0, err)
        return folder

    def test_errors(self):
        with open(self.path("bad.txt"), "w", encoding="utf-8") as f:
            f.write("hello?")
        with open(self.path("latin1.txt"), "wb") as f:
            f.write("hé".encode("latin-1"))
        self.assertFails(["eval", self.chars, "--data", self.path("bad.txt")], 1, r"bad.txt: .*outside .*'\?'")
        self.assertFails(["eval", self.chars, "--data", self.path("latin1.txt")], 1, "is not UTF-8 text")
        self.assertFails(["eval", self.chars, "--data", self.path("nothing.txt")], 1, "No such file")
        self.assertFails(["eval", self.chars], 2, "required: --data")
        shards = self.path("beyond")  # ids beyond the tokenizer's, without a meta.json that would say so
        os.makedirs(shards)
        write_shard(os.path.join(shards, "val_000000.bin"), [1, 2, 3] * 10)
        write_shard(os.path.join(shards, "val_000001.bin"), [1, 2, 300] * 10)
        self.assertFails(["eval", self.chars, "--data", shards], 1,
                         "val_000001.bin holds token id 300, outside the vocabulary .* 6 tokens")


class TestQuantize(CLITest):
    def test_quantized_checkpoint_works_with_sample_eval_and_info(self):
        quantized = self.path("gpt2-int8.pt")
        status, out, err = run("quantize", self.gpt2, "--out", quantized)
        self.assertEqual(status, 0, err)
        self.assertIn(f"wrote {quantized}: int8 weights", out)
        model = load_quantized(quantized)
        self.assertEqual(model.lm_head.weight.dtype, torch.int8)
        fp32 = GPT.from_checkpoint(self.gpt2)
        # a quarter of fp32, plus an fp32 scale per row: 1/n_embd = 1/16 more at this tiny width
        self.assertLess(os.path.getsize(quantized), (0.25 + 1 / 16 + 0.01) * 4 * fp32.num_parameters())

        status, out, err = run("info", quantized)
        self.assertEqual(status, 0, err)
        self.assertIn(f"parameters: {fp32.num_parameters():,} (int8 weights)", out)
        self.assertIn("tokenizer: GPT-2 BPE", out)

        status, out, err = run("sample", quantized, "--prompt", CHINESE[:2], "--seed", 1, "--max-new-tokens", 12)
        self.assertEqual(status, 0, err)
        self.assertEqual(out, TestSample.expected(self, quantized, CHINESE[:2], 1, 1, do_sample=True)[0] + "\n")

        with open(self.path("q.txt"), "w", encoding="utf-8") as f:
            f.write(CHINESE * 8)
        # batch 1: each forward quantizes its activations with one scale, so only equal batches give equal figures
        status, out, err = run("eval", quantized, "--data", self.path("q.txt"), "--batch-size", 1)
        self.assertEqual(status, 0, err)
        loss, _, bpb = TestEval.figures(self, out)
        ref_loss, ref_bpb = TestEval.reference(self, quantized, CHINESE * 8)
        self.assertAlmostEqual(loss, ref_loss, places=5)
        self.assertAlmostEqual(bpb, ref_bpb, places=5)

        self.assertFails(["quantize", quantized, "--out", self.path("again.pt")], 1, "quantized already")
        self.assertFails(["quantize", self.gpt2, "--out", quantized], 1, "exists; .* --overwrite")
        self.assertFails(["quantize", self.gpt2, "--out", self.gpt2, "--overwrite"], 1, "is also an input of this command")
        self.assertEqual(run("quantize", self.gpt2, "--out", quantized, "--overwrite")[0], 0)

    def test_int8_layers_all_reaches_the_model_of_sample_and_eval(self):
        quantized = self.path("chars-int8.pt")
        self.assertEqual(run("quantize", self.chars, "--out", quantized)[0], 0)
        with open(self.path("q-chars.txt"), "w", encoding="utf-8") as f:
            f.write("hello " * 20)  # the checkpoint's five characters
        with patch("mygpt.quantize.load_quantized", wraps=load_quantized) as loader:
            status, out, err = run("sample", quantized, "--prompt", "he", "--seed", 3, "--max-new-tokens", 12,
                                   "--int8-layers", "all")
            self.assertEqual(status, 0, err)
            self.assertEqual(loader.call_args.kwargs["layers"], "all")
            self.assertEqual(out, TestSample.expected(self, quantized, "he", 3, 1, int8_layers="all",
                                                      do_sample=True)[0] + "\n")
            status, out, err = run("eval", quantized, "--data", self.path("q-chars.txt"), "--int8-layers", "all")
            self.assertEqual(status, 0, err)
            self.assertEqual(loader.call_args.kwargs["layers"], "all")
            self.assertEqual(run("sample", quantized, "--max-new-tokens", 2)[0], 0)
            self.assertEqual(loader.call_args.kwargs["layers"], "auto")  # the default
        for command in (["sample", quantized], ["eval", quantized, "--data", self.path("q-chars.txt")]):
            self.assertFails([*command, "--int8-layers", "int8"], 2, "invalid choice: 'int8' .*auto.*all")


class TestExport(CLITest):
    def test_hf_folder_loads_in_transformers_with_the_same_logits(self):
        if missing("transformers", "safetensors"):
            self.skipTest("transformers and safetensors are needed (pip install -e '.[test,export]')")
        import transformers
        status, out, err = run("export", self.gpt2, "--format", "hf", "--out", self.path("hf"))
        self.assertEqual(status, 0, err)
        self.assertIn("wrote", out)
        hf = transformers.GPT2LMHeadModel.from_pretrained(self.path("hf")).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(self.path("hf"))
        ids = hf_tokenizer(CHINESE + " ok", return_tensors="pt")["input_ids"]  # 12 tokens: within block_size
        self.assertEqual(ids[0].tolist(), load_tokenizer({"type": "gpt2"}).encode(CHINESE + " ok"))
        with torch.no_grad():
            expected, _ = GPT.from_checkpoint(self.gpt2)(ids)
            torch.testing.assert_close(hf(ids).logits, expected, atol=1e-5, rtol=0)
        self.assertFails(["export", self.gpt2, "--format", "hf", "--out", self.path("hf")], 1, "exists")

    def test_gguf_file_reads_back(self):  # weights alone: the hf test covers the tokenizer, GGUF's is slow to read
        if missing("gguf"):
            self.skipTest("gguf is needed (pip install -e '.[export]')")
        import gguf
        path = self.path("model.gguf")
        status, out, err = run("export", self.gpt2, "--format", "gguf", "--dtype", "f32", "--no-tokenizer",
                               "--out", path)
        self.assertEqual(status, 0, err)
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        model = GPT.from_checkpoint(self.gpt2)
        self.assertEqual(tensors["token_embd.weight"].tensor_type.name, "F32")
        torch.testing.assert_close(torch.from_numpy(tensors["token_embd.weight"].data.copy()),
                                   model.transformer.wte.weight.detach(), atol=0, rtol=0)
        self.assertEqual(reader.fields["gpt2.context_length"].parts[-1][0], model.block_size)
        self.assertNotIn("tokenizer.ggml.tokens", reader.fields)
        self.assertIn("weights only: no tokenizer", out)

    def test_refusals(self):
        self.assertFails(["export", self.chars, "--format", "gguf", "--out", self.path("c.gguf")], 1,
                         "character vocabulary.*--no-tokenizer")
        self.assertFails(["export", self.gpt2, "--format", "onnx", "--out", self.path("x")], 2,
                         "invalid choice: 'onnx'")
        self.assertFails(["export", self.gpt2, "--format", "hf", "--dtype", "f16", "--out", self.path("x")], 2,
                         "--dtype applies to --format gguf only")
        quantized = self.path("for-export-int8.pt")
        self.assertEqual(run("quantize", self.gpt2, "--out", quantized)[0], 0)
        self.assertFails(["export", quantized, "--format", "hf", "--out", self.path("q-hf")], 1,
                         "cannot export an int8 model")


def png_size(path):
    """(width, height) from a PNG's signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


class TestPlot(CLITest):
    def test_png_from_a_history_csv_and_from_a_checkpoint(self):
        if missing("matplotlib"):
            self.skipTest("matplotlib is needed (pip install -e '.[plot]')")
        run_dir = self.path("run")
        os.makedirs(run_dir, exist_ok=True)
        self.chars_trainer.save_history(os.path.join(run_dir, "history.csv"))
        status, out, err = run("plot", run_dir, "--width", 4, "--height", 3, "--dpi", 50)
        self.assertEqual(status, 0, err)
        self.assertEqual(out, f"wrote {os.path.join(run_dir, 'loss.png')}\n")
        self.assertEqual(png_size(os.path.join(run_dir, "loss.png")), (200, 150))
        status, out, err = run("plot", self.chars, "--out", self.path("from-ckpt.png"))
        self.assertEqual(status, 0, err)
        self.assertEqual(png_size(self.path("from-ckpt.png")), (800, 450))
        self.assertFails(["plot", self.path("no-run")], 1, "no history at")
        self.assertFails(["plot", run_dir, "--dpi", 100000], 2, "--width 8 x --dpi 100000 is 800,000 pixels")
        malformed = {"letters.csv": ("iter,tokens,loss\n1,8,0.5\n2,16,x\n", "row 2: loss is 'x', not a number"),
                     "dict.json": ('{"loss": 1}', "holds a JSON dict, not a list of rows"),
                     "strings.json": ('["a"]', "row 1: 'a' is not a row of named values"),
                     "binary.csv": ("\x89PNG\x00\xff", "is not a history .csv or .json file"),
                     "broken.json": ("[{", "is not a history .csv or .json file")}
        for name, (content, message) in malformed.items():
            with self.subTest(name):
                with open(self.path(name), "wb") as f:
                    f.write(content.encode("latin-1"))
                self.assertFails(["plot", self.path(name), "--out", self.path("x.png")], 1,
                                 re.escape(self.path(name)) + ".*" + re.escape(message))
        self.assertFails(["plot", run_dir, "--dpi", 0], 2, "--dpi: must be a positive integer")
        # the overwrite rule of the other writers; never an input, never something other than a file
        self.assertFails(["plot", run_dir], 1, "loss.png exists; choose another --out or pass --overwrite")
        self.assertEqual(run("plot", run_dir, "--overwrite", "--dpi", 20)[0], 0)
        self.assertEqual(png_size(os.path.join(run_dir, "loss.png")), (160, 90))
        history = os.path.join(run_dir, "history.csv")
        before = Path(history).read_bytes()
        self.assertFails(["plot", run_dir, "--out", history, "--overwrite"], 1, "also an input of this command")
        self.assertFails(["plot", self.chars, "--out", self.chars, "--overwrite"], 1, "also an input")
        os.mkfifo(self.path("fifo"))  # like a copy of /dev/null: renaming over it would replace it
        self.assertFails(["plot", run_dir, "--out", self.path("fifo"), "--overwrite"], 1, "not a regular file")
        self.assertFails(["quantize", self.chars, "--out", self.path("fifo"), "--overwrite"], 1, "not a regular file")
        self.assertTrue(stat.S_ISFIFO(os.stat(self.path("fifo")).st_mode))
        self.assertEqual(Path(history).read_bytes(), before)


class TestPrepare(CLITest):
    def test_writes_what_prepare_corpus_writes(self):
        with open(self.path("a.txt"), "w", encoding="utf-8") as f:
            f.write("Hello, world. " * 50)
        with open(self.path("b.txt"), "w", encoding="utf-8") as f:
            f.write(CHINESE * 20)
        status, out, err = run("prepare", self.path("a.txt"), self.path("b.txt"), "--out", self.path("cli"),
                               "--val-fraction", 0.5, "--shard-tokens", 100, "--seed", 3, "--num-workers", 1)
        self.assertEqual(status, 0, err)
        with contextlib.redirect_stderr(io.StringIO()):
            meta = prepare_corpus([self.path("a.txt"), self.path("b.txt")], self.path("direct"), val_fraction=0.5,
                                  shard_tokens=100, seed=3, num_workers=1)
        for split in ("train", "val"):
            self.assertIn(f"{split}: {meta[split]['documents']} documents, {meta[split]['tokens']:,} tokens in "
                          f"{meta[split]['shards']} shards", out)
        names = sorted(n for n in os.listdir(self.path("direct")) if n.endswith(".bin"))
        self.assertEqual(sorted(n for n in os.listdir(self.path("cli")) if n.endswith(".bin")), names)
        self.assertGreater(len(names), 2)
        for name in names:
            with open(os.path.join(self.path("cli"), name), "rb") as a, \
                    open(os.path.join(self.path("direct"), name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)

    def test_errors(self):
        self.assertFails(["prepare", self.path("a.txt")], 2, "required: --out")
        self.assertFails(["prepare", self.path("missing.txt"), "--out", self.path("x")], 1, "missing.txt")
        self.assertFails(["prepare", self.path("missing.txt"), "--out", self.path("x"), "--tokenizer", "llama"], 1,
                         "--tokenizer 'llama': give 'gpt2'")
        with open(self.path("text.txt"), "w", encoding="utf-8") as f:
            f.write("hello world\n")
        with open(self.path("chars.json"), "w", encoding="utf-8") as f:
            f.write("[bad")
        self.assertFails(["prepare", self.path("text.txt"), "--out", self.path("text.txt")], 1,
                         "--out .*text.txt is a file; give a folder")
        self.assertFails(["prepare", self.path("text.txt"), "--out", self.path("y"), "--tokenizer",
                          self.path("chars.json")], 1, "--tokenizer .*chars.json is not JSON")
        self.assertFalse(os.path.exists(self.path("y")))


class TestInfo(CLITest):
    def test_reports_what_the_checkpoint_holds(self):
        for path, trainer in ((self.gpt2, self.gpt2_trainer), (self.chars, self.chars_trainer)):
            with self.subTest(path=os.path.basename(path)):
                status, out, err = run("info", path)
                self.assertEqual(status, 0, err)
                self.assertIn(f"run_id: {trainer.run_id}\n", out)
                self.assertIn(f"parameters: {trainer.model.num_parameters():,}\n", out)
                self.assertIn(f"  n_embd: {trainer.model.config.n_embd}\n", out)
                self.assertIn(f"  vocab_size: {trainer.model.config.vocab_size}\n", out)
                self.assertIn(f"trained: {trainer.iter_num:,} iterations, {trainer.tokens:,} target tokens", out)
                self.assertIn(f"last train loss: {trainer.history[-1]['loss']:.6f}", out)
                self.assertIn(f"last val loss: {trainer.history[-1]['val_loss']:.6f}", out)
                number, unit = re.search(r"^checkpoint: .* \(([\d.]+) (KB|MB)\)$", out, re.M).groups()
                size = float(number) * {"KB": 1e3, "MB": 1e6}[unit]
                self.assertLessEqual(abs(size - os.path.getsize(path)), 0.05 * {"KB": 1e3, "MB": 1e6}[unit])
        self.assertIn("tokenizer: GPT-2 BPE (50,257 tokens, <|endoftext|> = 50256)", run("info", self.gpt2)[1])
        self.assertIn("tokenizer: characters + <|endoftext|> (6 tokens, <|endoftext|> = 5)",
                      run("info", self.chars)[1])

    def test_checkpoints_without_a_text_tokenizer(self):
        for tokenizer, shown, refusal in ((None, "none recorded", "records no tokenizer"),
                                          ({"type": "palette", "colours": [[0, 0, 0]]}, "type 'palette' (not text",
                                           "tokenizer of type 'palette', not one of text")):
            with self.subTest(tokenizer=tokenizer):
                state = dict(torch.load(self.chars, weights_only=True), tokenizer=tokenizer)
                save_checkpoint(state, self.path("other.pt"))
                status, out, err = run("info", self.path("other.pt"))
                self.assertEqual(status, 0, err)
                self.assertIn(f"tokenizer: {shown}", out)
                self.assertFails(["sample", self.path("other.pt"), "--prompt", "he"], 1, refusal)

    def test_tokenizer_larger_than_the_model_is_refused(self):
        encoder = train_bpe("hello world " * 20, 270)
        bpe = describe_tokenizer(encoder)
        save_checkpoint(dict(torch.load(self.chars, weights_only=True), tokenizer=bpe), self.path("bpe.pt"))
        self.assertFails(["info", self.path("bpe.pt")], 1, rf"its tokenizer \(trained BPE\) has {encoder.vocab_size} "
                                                           rf"tokens, more than the model's vocab_size 6")

    def test_errors(self):
        self.assertFails(["info", self.path("missing.pt")], 1, "no checkpoint at")
        self.assertFails(["info", self.dir], 1, "holds no best.pt or checkpoint.pt")  # a run's work dir is read


class TestHelp(CLITest):
    def test_every_subcommand_has_help(self):
        for command in ("sample", "eval", "info", "prepare", "quantize", "export", "plot"):
            with self.subTest(command=command):
                status, out, _ = run(command, "--help")
                self.assertEqual(status, 0)
                self.assertTrue(out.startswith(f"usage: mygpt {command} "), out)

    @process_level
    def test_python_dash_m(self):
        result = subprocess.run([sys.executable, "-m", "mygpt", "--help"], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        for command in ("sample", "eval", "info", "prepare", "quantize", "export", "plot"):
            self.assertIn(command, result.stdout)


class TestEvalTasks(CLITest):
    """mygpt eval --task: the figures of mygpt.tasks.eval_task (tested against a plain loop in test_evals)."""

    HELLASWAG = {"activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he",
                 "ctx": "A man cuts an onion. he", "endings": ["cries.", "sings [step] loudly.", "eats it.", "stops."],
                 "label": "2"}
    PIQA = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}

    def rows(self, name, rows):
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return path

    def test_json_and_several_tasks(self):
        from mygpt.tasks import core_score, eval_task
        hellaswag = self.rows("hellaswag.jsonl", [self.HELLASWAG, dict(self.HELLASWAG, label="0")] * 2)
        piqa = self.rows("piqa.jsonl", [self.PIQA, dict(self.PIQA, label=1)])
        model, tokenizer = load_model(self.gpt2), load_tokenizer({"type": "gpt2"})
        for style in ("lm-eval", "llm.c"):
            with self.subTest(style=style):
                status, out, err = run("eval", self.gpt2, "--task", "hellaswag", "--data", hellaswag, "--json",
                                       "--style", style, "--limit", 3, "--batch-size", 5, "--precision", "fp32")
                self.assertEqual(status, 0, err)
                result = json.loads(out.splitlines()[-1])
                want = eval_task(model, tokenizer, "hellaswag", hellaswag, limit=3, style=style)
                self.assertEqual({k: result[k] for k in ("task", "n", "acc", "acc_norm", "style")},
                                 {k: want[k] for k in ("task", "n", "acc", "acc_norm", "style")})
        status, out, err = run("eval", self.gpt2, "--task", f"hellaswag={hellaswag}", f"piqa={piqa}", "--json")
        self.assertEqual(status, 0, err)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([line["task"] for line in lines], ["hellaswag", "piqa", "core"])
        core = core_score(lines[:2])
        self.assertEqual((lines[2]["n"], lines[2]["acc"], lines[2]["acc_norm"]), (6, core["acc"], core["acc_norm"]))
        status, out, err = run("eval", self.gpt2, "--task", f"hellaswag={hellaswag}", f"piqa={piqa}")
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"^hellaswag: acc [0-9.]+  acc_norm [0-9.]+  \(4 examples of .*hellaswag.jsonl, "
                              r"lm-eval style, [0-9.]+ s\)\npiqa: .*\ncore \(each accuracy centred on chance, "
                              r"averaged over 2 tasks\): acc -?[0-9.]+  acc_norm -?[0-9.]+\n$")

    def test_errors(self):
        hellaswag = self.rows("hs.jsonl", [self.HELLASWAG, {"ctx_a": "no label"}])
        self.assertFails(["eval", self.gpt2, "--task", "hellaswag", "--data", hellaswag, "--limit", 0], 2,
                         "--limit: must be a positive integer, got 0")
        self.assertFails(["eval", self.gpt2, "--task", "mmlu"], 2,
                         "unknown task 'mmlu'; the tasks are hellaswag, arc_easy, arc_challenge, piqa, winogrande")
        # --precision fp32: auto would print its timed choice on a line before the error
        self.assertFails(["eval", self.gpt2, "--task", "hellaswag", "--data", hellaswag, "--precision", "fp32"], 1,
                         r"hs.jsonl, row 2: no field 'activity_label', which hellaswag needs")
        self.assertFails(["eval", self.chars, "--task", "hellaswag", "--data", hellaswag, "--limit", 1], 1,
                         r"hs.jsonl row 1: the checkpoint's tokenizer \(characters \+ <\|endoftext\|>\) cannot "
                         r"encode it .*GPT-2's BPE")
        self.assertFails(["eval", self.gpt2, "--task", "piqa", "--data", self.rows("empty.jsonl", []), "--precision",
                          "fp32"], 1,
                         "empty.jsonl holds no rows")
        self.assertFails(["eval", self.gpt2, "--task", "piqa", "hellaswag", "--data", hellaswag], 2,
                         "for several tasks give each its file as NAME=FILE")
        self.assertFails(["eval", self.gpt2, "--data", hellaswag, "--json"], 2, "--json applies with --task only")
        self.assertFails(["eval", self.gpt2, "--task", "piqa", "--max-batches", 1], 2, "use --limit")


if __name__ == "__main__":
    unittest.main()
