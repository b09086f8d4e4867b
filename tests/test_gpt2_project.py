"""projects/gpt2: prepare, train, resume and sample end to end on a small text; GPT-2 weights from a local
transformers folder scored exactly as transformers scores them; bits per byte by hand; every configuration builds."""

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import mygpt.downloads
import mygpt.quantize
import mygpt.tasks
from mygpt import GPT, GPT2_NAMES, cli, eval_task, generate_texts, get_encoder, load_checkpoint, save_quantized
from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, VOCAB_DIR
from mygpt.downloads import _CACHE_ENV
from mygpt.data import HEADER_BYTES, TokenDataset, write_shard
from mygpt.evaluate import score
from mygpt.precision import native
from mygpt.prepare import prepare_corpus
from mygpt.tokenizer import load_tokenizer
from tests.helpers import detach_log_handlers, process_level
from tests.test_downloads import closed_port

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "projects" / "gpt2"
TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--data.block_size=16",
        "--trainer.batch_size=4", "--trainer.quiet=True", "--trainer.log_interval=1", "--trainer.device=cpu",
        "--trainer.precision=fp32"]  # the default 'auto' may time its way to bf16 on a bf16 CPU: runs are compared
# prose with accents and a dash, so that bytes and characters differ
TEXT = "".join(f"ROMEO {i}:\nThe café by the river — naïve and fair — holds {i * 7} roses.\n\n"
               for i in range(60))


def load(name):
    spec = importlib.util.spec_from_file_location(f"gpt2_{name}", PROJECT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare, train = load("prepare"), load("train")


def run_script(name, *args):
    """Run a project script as a user would; its stdout, or the test fails with its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(PROJECT / f"{name}.py"), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{name}.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def read_tokens(path):
    """A shard's tokens read with plain numpy: the 1024-byte header, then uint16."""
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).astype(np.int64)


def prepared_corpus(folder, text=TEXT):
    path = os.path.join(folder, "text.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    out = os.path.join(folder, "corpus")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.main([path, f"--out={out}", "--val_fraction=0.2", "--num_workers=1"])
    return out


def random_transformers_gpt2(folder, seed=0):
    """A randomly initialised GPT-2 of GPT-2's vocabulary, tiny otherwise, saved with save_pretrained."""
    transformers = __import__("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():  # biases and gains too, so that a weight put in the wrong place shows
            p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return model.eval()


def needs(module):
    return unittest.skipUnless(importlib.util.find_spec(module), f"needs {module} (pip install 'mygpt[test]')")


@process_level
class TestPrepare(unittest.TestCase):
    def test_one_text_is_cut_like_nanogpt(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = prepared_corpus(tmp)
            enc = get_encoder()
            cut = int(len(TEXT) * 0.8)
            # nanoGPT's ids, each part a document of prepare_corpus: it ends with <|endoftext|>
            self.assertEqual(read_tokens(os.path.join(out, "train_000000.bin")).tolist(),
                             enc.encode_ordinary(TEXT[:cut]) + [50256])
            self.assertEqual(read_tokens(os.path.join(out, "val_000000.bin")).tolist(),
                             enc.encode_ordinary(TEXT[cut:]) + [50256])
            self.assertEqual(TokenDataset(os.path.join(out, "val_*.bin"), 8).vocab_size, 50257)
            # `mygpt prepare` cuts it the same way (its default val_fraction for one text is nanoGPT's 0.1)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                self.assertEqual(cli.main(["prepare", os.path.join(tmp, "text.txt"), "--out", f"{tmp}/cli",
                                           "--num-workers", "1"]), 0)
            self.assertEqual(read_tokens(f"{tmp}/cli/val_000000.bin").tolist(),
                             enc.encode_ordinary(TEXT[int(len(TEXT) * 0.9):]) + [50256])
            # another corpus is never written over this one
            other = os.path.join(tmp, "other.txt")
            with open(other, "w", encoding="utf-8") as f:
                f.write(TEXT.upper())
            with self.assertRaisesRegex(ValueError, "holds a corpus prepared with other settings"):
                prepare.main([other, f"--out={out}", "--val_fraction=0.2"])

    def test_documents_go_through_prepare_corpus_and_llmc_shards_are_used_as_they_are(self):
        with tempfile.TemporaryDirectory() as tmp:
            docs = os.path.join(tmp, "docs.jsonl")
            with open(docs, "w", encoding="utf-8") as f:
                for i in range(40):
                    f.write(json.dumps({"text": f"document {i}: {TEXT[:200]}"}) + "\n")
            out = os.path.join(tmp, "corpus")
            prepare.main([docs, f"--out={out}", "--val_fraction=0.2", "--num_workers=1"])
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
            self.assertEqual(meta["train"]["documents"] + meta["val"]["documents"], 40)
            self.assertGreater(meta["val"]["documents"], 0)
            # a document ends with <|endoftext|>
            self.assertEqual(read_tokens(os.path.join(out, "train_000000.bin"))[-1], 50256)

            # llm.c's names: fineweb_train_000001.bin, fineweb_val_000000.bin
            llmc = os.path.join(tmp, "fineweb10B")
            os.makedirs(llmc)
            tokens = get_encoder().encode_ordinary(TEXT)
            write_shard(os.path.join(llmc, "fineweb_val_000000.bin"), tokens[:300])
            write_shard(os.path.join(llmc, "fineweb_train_000001.bin"), tokens[300:])
            config = train.get_config_from_args([f"--data.dir={llmc}", *TINY])
            self.assertEqual(train.open_split(config, "train").num_tokens, len(tokens) - 300)
            self.assertEqual(train.open_split(config, "val").num_tokens, 300)


@process_level
class TestTrainResumeSample(unittest.TestCase):
    def test_prepare_train_refuse_rerun_resume_and_sample(self):
        with tempfile.TemporaryDirectory() as tmp:
            text = os.path.join(tmp, "text.txt")
            with open(text, "w", encoding="utf-8") as f:
                f.write(TEXT)
            data, work = os.path.join(tmp, "data"), os.path.join(tmp, "run")
            out = run_script("prepare", text, f"--out={data}")
            self.assertIn("train:", out)
            common = [f"--data.dir={data}", f"--system.work_dir={work}", *TINY, "--trainer.eval_interval=3",
                      "--trainer.eval_iters=2", "--sample.length=8", "--sample.prompt=ROMEO"]
            run_script("train", "cpu", "--trainer.max_iters=6", *common)
            with open(os.path.join(work, "log.txt"), encoding="utf-8") as f:
                log = f.read()
            self.assertEqual(re.findall(r"iter (\d+): val loss \d+\.\d+, \d+\.\d+ bits per byte", log), ["0", "3", "6"])
            self.assertEqual(re.findall(r"sample at iter (\d+):\nROMEO", log), ["3", "6"])  # none before training
            ckpt = load_checkpoint(os.path.join(work, "checkpoint.pt"))
            self.assertEqual(ckpt["tokenizer"], {"type": "gpt2"})
            self.assertEqual(ckpt["iter_num"], 6)
            self.assertEqual([h["iter"] for h in ckpt["history"] if "val_loss" in h], [3, 6])
            best = load_checkpoint(os.path.join(work, "best.pt"))
            losses = {h["iter"]: h["val_loss"] for h in ckpt["history"] if "val_loss" in h}
            self.assertEqual(best["iter_num"], min(losses, key=losses.get))

            # a rerun touches nothing and says how to go on
            before = Path(work, "checkpoint.pt").read_bytes()
            with self.assertRaises(FileExistsError) as cm:
                train.main(["cpu", "--trainer.max_iters=8", *common])
            for way in ("--trainer.resume=True", "--trainer.overwrite=True", "--system.work_dir"):
                self.assertIn(way, str(cm.exception))
            self.assertEqual(Path(work, "checkpoint.pt").read_bytes(), before)

            trainer = train.main(["cpu", "--init_from=resume", "--trainer.max_iters=9", *common])
            self.assertEqual(trainer.iter_num, 9)
            self.assertEqual(load_checkpoint(os.path.join(work, "checkpoint.pt"))["iter_num"], 9)
            self.assertEqual([h["iter"] for h in trainer.history if "val_loss" in h], [3, 6, 9])

            # --eval_only over the whole val split gives what `mygpt eval` gives on the same checkpoint
            result = train.main(["cpu", "--init_from=resume", "--eval_only=True", *common, "--trainer.eval_iters=None"])
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                # fp32, as the run evaluated: auto may take bf16 on this model (GPT-2's vocabulary makes its head large)
                self.assertEqual(cli.main(["eval", os.path.join(work, "checkpoint.pt"), "--data", data, "--precision",
                                           "fp32"]), 0)
            figures = dict(re.findall(r"^(loss|bits per byte): (\S+)$", printed.getvalue(), flags=re.M))
            self.assertAlmostEqual(result["val_loss"], float(figures["loss"]), places=5)
            self.assertAlmostEqual(result["bits_per_byte"], float(figures["bits per byte"]), places=5)

            out = run_script("sample", f"--work_dir={work}", "--prompt=ROMEO", "--num_samples=2",
                             "--max_new_tokens=5", "--seed=3")
            samples = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
            self.assertEqual(len(samples), 2)
            self.assertTrue(all(s.startswith("ROMEO") for s in samples))
            again = run_script("sample", f"--work_dir={work}", "--prompt=ROMEO", "--num_samples=2",
                               "--max_new_tokens=5", "--seed=3")
            self.assertEqual(out, again)

            # fine-tuning from this run's own model (its work dir: best.pt), as a new run elsewhere
            tuned = os.path.join(tmp, "tuned")
            start = GPT.from_checkpoint(os.path.join(work, "best.pt"))
            config = train.get_config_from_args(["cpu", f"--init_from={work}", f"--data.dir={data}", *TINY,
                                                 "--model.resid_pdrop=0.1"])
            model = train.build_model(config, resuming=False, data=train.open_split(config, "train"))
            for k, v in start.state_dict().items():
                self.assertTrue(torch.equal(v, model.state_dict()[k]), k)
            self.assertEqual((model.config.resid_pdrop, model.training), (0.1, True))  # the dropout to fine-tune with
            trainer = train.main(["cpu", f"--init_from={os.path.join(work, 'checkpoint.pt')}", "--trainer.max_iters=2",
                                  *[c for c in common if not c.startswith("--system.work_dir")],
                                  f"--system.work_dir={tuned}"])
            self.assertEqual(load_checkpoint(os.path.join(tuned, "checkpoint.pt"))["iter_num"], trainer.iter_num)
            self.assertEqual(trainer.iter_num, 2)
            # on data of another tokenizer it is refused, naming both
            chars = os.path.join(tmp, "chars")
            prepare_corpus(text, chars, tokenizer=sorted(set(TEXT)), num_workers=1, progress=False)
            with self.assertRaisesRegex(ValueError, "prepared with another tokenizer than --init_from="):
                train.build_model(config, resuming=False, data=TokenDataset(os.path.join(chars, "train_*.bin"), 16))
            # int8 weights are for inference only
            int8 = os.path.join(tmp, "int8.pt")
            save_quantized(start.quantize(), int8, tokenizer={"type": "gpt2"})
            with self.assertRaisesRegex(ValueError, f"--init_from={re.escape(int8)} holds int8 weights, for inference"):
                train.build_model(train.get_config_from_args([f"--init_from={int8}", *TINY]), resuming=False)
            # which sample.py runs, with the int8 kernel in every layer on --int8_layers=all (as `mygpt sample`)
            sample = load("sample")
            config = sample.get_config()
            config.merge_from_dict(dict(init_from=int8, int8_layers="all"))
            with mock.patch("mygpt.quantize.load_quantized", wraps=mygpt.quantize.load_quantized) as loader:
                model, _ = sample.load_model(config)
            self.assertEqual(loader.call_args.kwargs["layers"], "all")
            idx = torch.tensor([[3, 1, 4, 1, 5]])
            with torch.no_grad():
                self.assertTrue(torch.equal(model(idx)[0], mygpt.quantize.load_quantized(int8, layers="all")(idx)[0]))
            config.int8_layers = "int8"
            with self.assertRaisesRegex(ValueError, "layers must be 'auto' .* or 'all' .*, got 'int8'"):
                sample.load_model(config)

    def test_samples_stop_at_endoftext(self):
        config = GPT.get_default_config()
        config.merge_from_dict(dict(n_layer=1, n_head=1, n_embd=8, vocab_size=50257, block_size=16,
                                    tie_weights=False))
        model = GPT(config)
        with torch.no_grad():  # the final LayerNorm outputs its bias alone; only <|endoftext|>'s row scores it
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[50256] = 10.0
        tokenizer = load_tokenizer({"type": "gpt2"})
        self.assertEqual(generate_texts(model, tokenizer, "Hi", 5, num_samples=2), ["Hi", "Hi"])
        self.assertEqual(generate_texts(model, tokenizer, "Hi", 3, stop=False), ["Hi" + ENDOFTEXT * 3])


class TestPrecisionAuto(unittest.TestCase):
    def test_auto_is_resolved_for_training_and_for_eval_only(self):
        # 'auto' is what the Trainer (or score, for --eval_only) turns into fp32 or bf16, not a dtype name
        with tempfile.TemporaryDirectory() as tmp:
            data, work = prepared_corpus(tmp), os.path.join(tmp, "run")
            common = [f"--data.dir={data}", *TINY, "--trainer.eval_iters=2"]
            with contextlib.redirect_stdout(io.StringIO()):
                auto = train.main(["--eval_only=True", *common, "--trainer.precision=auto"])
                named = {p: train.main(["--eval_only=True", *common, f"--trainer.precision={p}"])
                         for p in ("fp32", "bf16")}
            self.assertIn(auto, named.values())  # computed in the precision it chose
            if not native("cpu", torch.bfloat16):
                self.assertEqual(auto, named["fp32"])

            trainer = train.main([*common, "--trainer.precision=auto", f"--system.work_dir={work}",
                                  "--trainer.max_iters=2", "--trainer.eval_interval=1", "--sample.length=0"])
            chosen = trainer.config.precision
            self.assertIn(chosen, ("fp32", "bf16"))
            self.assertEqual([h["iter"] for h in trainer.history if "val_loss" in h], [1, 2])
            # the Trainer's last evaluation is score's on the same windows, in the precision the run chose
            with contextlib.redirect_stdout(io.StringIO()):
                again = train.main(["--eval_only=True", "--init_from=resume", f"--system.work_dir={work}", *common,
                                    f"--trainer.precision={chosen}"])
            self.assertAlmostEqual(trainer.history[-1]["val_loss"], again["val_loss"], places=6)
            self.assertAlmostEqual(trainer.history[-1]["val_bpb"], again["bits_per_byte"], places=6)


class TestEvalTasks(unittest.TestCase):
    """--eval_tasks: a benchmark's fixed subset scored at each evaluation, into the history and history.csv."""

    ROW = {"activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he", "label": 1,
           "endings": ["cries.", "puts it in a pan.", "sings.", "leaves."]}

    def test_scored_at_each_evaluation_without_changing_the_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            data = prepared_corpus(tmp)
            rows = [self.ROW, dict(self.ROW, label=3), dict(self.ROW, endings=["goes on and on " * 5] * 4)]
            path = os.path.join(tmp, "hellaswag.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            common = [f"--data.dir={data}", *TINY, "--trainer.max_iters=3", "--trainer.eval_interval=2",
                      "--trainer.eval_iters=1", "--sample.length=0"]  # evaluations at steps 2 and 3, the last
            work = os.path.join(tmp, "scored")
            with contextlib.redirect_stdout(io.StringIO()):  # the log's lines
                plain = train.main([*common, f"--system.work_dir={tmp}/plain"])
                scored = train.main([*common, f"--system.work_dir={work}", f"--eval_tasks=hellaswag={path}"])
            detach_log_handlers()
            # scoring draws no random numbers and gives the model back in training mode: the same run
            for key in ("loss", "val_loss"):
                self.assertEqual([h.get(key) for h in scored.history], [h.get(key) for h in plain.history])
            with open(os.path.join(work, "history.csv"), newline="") as f:
                table = list(csv.DictReader(f))
            self.assertEqual([(r["iter"], r["hellaswag_acc"] != "", r["hellaswag_acc_norm"] != "") for r in table],
                             [("1", False, False), ("2", True, True), ("3", True, True)])
            # the last figures are the final model's on the two rows that fit block_size 16 (the third cannot)
            with open(os.path.join(tmp, "fit.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows[:2])
            want = eval_task(scored.model, load_tokenizer({"type": "gpt2"}), "hellaswag", f.name)
            self.assertEqual((float(table[2]["hellaswag_acc"]), float(table[2]["hellaswag_acc_norm"])),
                             (want["acc"], want["acc_norm"]))
            log = Path(work, "log.txt").read_text(encoding="utf-8")
            self.assertIn(f"--eval_tasks: hellaswag is scored at each evaluation on 2 rows of {path} (1 more have a "
                          f"choice longer than block_size 16)", log)
            self.assertEqual(re.findall(r"iter (\d+): hellaswag_acc [0-9.]+, hellaswag_acc_norm [0-9.]+", log),
                             ["2", "3"])
            self.assertIn("hellaswag_acc", load_checkpoint(os.path.join(work, "best.pt"))["history"][1])

    def test_without_rows_it_is_left_out_with_the_reason(self):
        offline = mygpt.tasks._CANONICAL["piqa"]._replace(url=f"http://127.0.0.1:{closed_port()}/piqa.zip")
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {_CACHE_ENV: tmp}), \
                mock.patch.dict(mygpt.tasks._CANONICAL, piqa=offline), \
                mock.patch.object(mygpt.tasks, "_olmo_rows", return_value=None), \
                mock.patch.object(mygpt.downloads, "_FIRST_BACKOFF", 0.01):
            data, work = prepared_corpus(tmp), os.path.join(tmp, "run")
            common = [f"--data.dir={data}", *TINY, "--trainer.max_iters=2", "--trainer.eval_interval=2",
                      "--trainer.eval_iters=1", "--sample.length=0"]
            with contextlib.redirect_stdout(io.StringIO()):  # the log's lines
                trainer = train.main([*common, f"--system.work_dir={work}", "--eval_tasks=piqa"])
            detach_log_handlers()
            self.assertEqual(trainer.iter_num, 2)
            self.assertFalse(any("piqa_acc" in h for h in trainer.history))
            log = Path(work, "log.txt").read_text(encoding="utf-8")
            self.assertIn("--eval_tasks: piqa is not scored: piqa needs its rows: give a file", log)
            self.assertIn(f"place it at {os.path.join(tmp, 'piqa.zip')}", log)
            # a misspelt task, or a file named that is not there, is refused before anything is written
            for option, error, message in [
                    ("--eval_tasks=hellaswag,mmlu", ValueError, "--eval_tasks: unknown task 'mmlu'; the tasks are "),
                    ("--eval_tasks=piqa=nowhere.jsonl", FileNotFoundError, "nowhere.jsonl: no such file"),
                    ("--eval_tasks_limit=0", ValueError, "--eval_tasks_limit must be at least 1")]:
                refused = os.path.join(tmp, option.split("=")[0][2:])
                with self.subTest(option), self.assertRaisesRegex(error, message):
                    train.main([*common, f"--system.work_dir={refused}", "--eval_tasks=piqa=x.jsonl"
                                if option.startswith("--eval_tasks_limit") else "--eval_tasks=", option])
                self.assertEqual(os.listdir(refused) if os.path.exists(refused) else [], [])  # no log, no config


@needs("transformers")
@process_level
class TestGPT2Weights(unittest.TestCase):
    def test_loss_equals_transformers_and_tying_survives_training(self):
        with tempfile.TemporaryDirectory() as tmp:
            data = prepared_corpus(tmp)
            hf_dir = os.path.join(tmp, "hf")
            hf = random_transformers_gpt2(hf_dir)
            T = 32
            tokens = torch.from_numpy(read_tokens(os.path.join(data, "val_000000.bin")))
            n = (len(tokens) - 1) // T
            windows = torch.stack([tokens[i * T:i * T + T + 1] for i in range(n)])  # (n, T + 1)
            with torch.no_grad():  # transformers shifts the labels itself: T targets per window
                reference = hf(input_ids=windows, labels=windows).loss.item()

            common = [f"--init_from={hf_dir}", f"--data.dir={data}", f"--data.block_size={T}",
                      "--trainer.batch_size=3", "--trainer.eval_iters=1000", "--trainer.device=cpu"]
            result = train.main([*common, "--eval_only=True"])
            self.assertEqual(result["targets"], n * T)
            self.assertLess(abs(result["val_loss"] - reference), 1e-4)

            work = os.path.join(tmp, "run")
            trainer = train.main([*common, f"--system.work_dir={work}", "--trainer.max_iters=2",
                                  "--trainer.eval_interval=2", "--trainer.learning_rate=1e-3",
                                  "--trainer.quiet=True", "--sample.length=4"])
            with open(os.path.join(work, "log.txt"), encoding="utf-8") as f:
                before = float(re.search(r"iter 0: val loss (\d+\.\d+)", f.read()).group(1))
            self.assertLess(abs(before - reference), 1e-4)  # the loss before training, as logged
            self.assertTrue(trainer.model.config.tie_weights)

            ckpt = load_checkpoint(os.path.join(work, "checkpoint.pt"))
            self.assertTrue(ckpt["model_config"]["tie_weights"])
            self.assertTrue(torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model"]["transformer.wte.weight"]))
            self.assertFalse(torch.equal(ckpt["model"]["lm_head.weight"], hf.lm_head.weight))  # it trained
            model = GPT.from_checkpoint(ckpt)
            self.assertIs(model.lm_head.weight, model.transformer.wte.weight)
            self.assertEqual(model.num_parameters(), sum(p.numel() for p in hf.parameters()))

            out = run_script("sample", f"--init_from={hf_dir}", "--prompt=ROMEO", "--num_samples=1",
                             "--max_new_tokens=4")
            self.assertTrue(out.startswith("ROMEO"))


@needs("tiktoken")
class TestBitsPerByte(unittest.TestCase):
    def test_against_a_hand_computation(self):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        ranks = data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "gpt2" / "vocab.bpe"),
                                                str(VOCAB_DIR / "gpt2" / "encoder.json"))
        tk = tiktoken.Encoding("gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                               special_tokens={ENDOFTEXT: 50256})
        torch.manual_seed(0)
        config = GPT.get_default_config()
        config.merge_from_dict(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, block_size=16))
        model = GPT(config).eval()
        with tempfile.TemporaryDirectory() as tmp:
            data = prepared_corpus(tmp)
            T = 10
            dataset = TokenDataset(os.path.join(data, "val_*.bin"), T)
            result = score(model, dataset, batch_size=3, tokenizer=load_tokenizer({"type": "gpt2"}))
            loss, bpb, targets = result.loss, result.bits_per_byte, result.targets
            tokens = torch.from_numpy(read_tokens(os.path.join(data, "val_000000.bin")))
        n = (len(tokens) - 1) // T
        nats = 0.0
        with torch.no_grad():
            for i in range(n):
                x, y = tokens[i * T:i * T + T], tokens[i * T + 1:i * T + T + 1]
                logits = model(x[None])[0][0].double()  # (T, vocab)
                nats += (torch.logsumexp(logits, dim=-1) - logits[torch.arange(T), y]).sum().item()
        nbytes = len(tk.decode_bytes(tokens[1:n * T + 1].tolist()))  # every token but the first and the tail
        self.assertEqual(targets, n * T)
        self.assertLess(nbytes, len(tk.decode_bytes(tokens.tolist())))
        self.assertAlmostEqual(loss, nats / (n * T), places=5)
        self.assertAlmostEqual(bpb, nats / math.log(2) / nbytes, places=5)


class TestConfigurations(unittest.TestCase):
    def test_every_configuration_parses_and_builds_its_model(self):
        names = train.configuration_names()
        self.assertEqual(names, ["cpu", "eval_gpt2", "finetune_shakespeare", "gpt2_124m_owt"])
        for name in names:
            with self.subTest(name):
                config = train.get_config_from_args([name])
                if config.init_from == "scratch":
                    model = train.build_model(config, resuming=False)
                else:  # OpenAI's weights cannot be fetched here: build their shape, without weights
                    self.assertIn(config.init_from, GPT2_NAMES)
                    mc = GPT.get_default_config()
                    mc.merge_from_dict(dict(model_type=config.init_from, vocab_size=50257, block_size=1024))
                    with torch.device("meta"):
                        model = GPT(mc)
                self.assertLessEqual(config.data.block_size, model.config.block_size)
                self.assertTrue(model.config.tie_weights)
                expected = {"cpu": 7_242_624, "gpt2_124m_owt": 124_475_904, "eval_gpt2": 124_439_808,
                            "finetune_shakespeare": 1_557_611_200}[name]
                self.assertEqual(model.num_parameters(), expected)
        owt = train.get_config_from_args(["gpt2_124m_owt"]).trainer
        tokens_per_step = owt.batch_size * owt.grad_accum_steps * 8 * 1024
        self.assertEqual(tokens_per_step, 491_520)  # nanoGPT's ~0.5M on 8 GPUs
        self.assertEqual(owt.warmup_tokens, 2000 * tokens_per_step)
        self.assertEqual(owt.final_tokens, 600_000 * tokens_per_step)
        self.assertTrue(train.get_config_from_args(["eval_gpt2"]).eval_only)

    def test_train_and_sample_live_on_the_public_api(self):
        for name in ("train", "sample"):
            source = (PROJECT / f"{name}.py").read_text(encoding="utf-8")
            self.assertEqual(re.findall(r"^\s*(?:from|import) mygpt\.\S+", source, flags=re.M), [], name)
            self.assertNotIn("sys.path", source, name)

    def test_overrides_come_after_configurations_and_unknown_names_are_refused(self):
        config = train.get_config_from_args(["--trainer.max_iters=7", "cpu"])
        self.assertEqual(config.trainer.max_iters, 7)
        self.assertEqual(config.model.n_layer, 4)
        with self.assertRaises(FileNotFoundError) as cm:
            train.get_config_from_args(["cpux"])
        self.assertIn("cpu", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            train.build_model(train.get_config_from_args(["--init_from=gpt3"]), resuming=False)
        self.assertIn("scratch", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
