"""
The loss curve of a run: train and validation loss against tokens seen (log scale), the learning rate on a
second axis, and, when the history holds benchmark accuracies (mygpt.TaskCallback's "<task>_acc" and
"<task>_acc_norm"), a panel of them below. matplotlib is optional (pip install 'mygpt[plot]') and imported only here.

    plot_history("out/chargpt")                  # the run's history.csv -> out/chargpt/loss.png
    plot_history(trainer.history, "loss.png")    # straight from a Trainer
    write_history(trainer, "out/run")            # a run's end: out/run/history.csv, and loss.png beside it
"""

import csv
import json
import os
from pathlib import Path

from mygpt.utils import atomic_path

_VAL_KEYS = ("val_loss", "test_loss")  # the trainer's name for the evaluation loss, and its older one
_ACCURACY_SUFFIXES = ("_acc", "_acc_norm")  # the columns TaskCallback adds, one pair per task


def read_history(source):
    """The history as a list of dicts: from a list (Trainer.history), a .csv or .json file, or a run dir."""
    if isinstance(source, (list, tuple)):
        return list(source)
    path = Path(source)
    if path.is_dir():
        path = path / "history.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no history at {path}: give a run's work dir (with history.csv), a history .csv or "
                                f".json file (Trainer.save_history), or trainer.history")
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _column(history, key):
    """(tokens, values) of the rows where key has a value (a CSV leaves missing ones empty) and tokens > 0."""
    xs, ys = [], []
    for row in history:
        value, tokens = row.get(key), row.get("tokens")
        if value not in (None, "") and tokens not in (None, "") and float(tokens) > 0:
            xs.append(float(tokens))
            ys.append(float(value))
    return xs, ys


def _accuracy_keys(history):
    """The history's accuracy columns, in the order they first appear."""
    keys = dict.fromkeys(k for row in history for k in row if k.endswith(_ACCURACY_SUFFIXES))
    return [k for k in keys if _column(history, k)[0]]


def _loss_figure(history, width=8.0, height=4.5, dpi=100):
    """A matplotlib Figure of width x height inches at dpi: losses on the left axis, learning rate on the right;
    below them, sharing the tokens axis, the benchmark accuracies if the history holds any."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'mygpt[plot]' (or pip install matplotlib)") from e
    train = _column(history, "loss")
    if not train[0]:
        raise ValueError("the history has no rows with tokens and loss: is it a Trainer's history?")
    fig = Figure(figsize=(width, height), dpi=dpi)  # no pyplot: the caller's backend and figures stay untouched
    accuracies = _accuracy_keys(history)
    if accuracies:  # the losses keep two thirds of the height
        ax, acc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (2, 1)})
    else:
        ax = fig.add_subplot()
    ax.plot(*train, color="tab:blue", linewidth=0.8, label="train loss")
    val_key = next((k for k in _VAL_KEYS if _column(history, k)[0]), None)
    if val_key:
        ax.plot(*_column(history, val_key), "o-", color="tab:orange", markersize=3, label="validation loss")
    ax.set_xscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    lr = ax.twinx()
    lr.plot(*_column(history, "lr"), color="tab:gray", linestyle="--", linewidth=0.8, label="learning rate")
    lr.set_ylabel("learning rate")
    lines = ax.get_lines() + lr.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    if accuracies:
        for i, key in enumerate(accuracies):  # colours after the losses' blue and orange, so none looks like them
            acc.plot(*_column(history, key), "o-", color=f"C{2 + i % 8}", markersize=3, linewidth=0.8, label=key)
        acc.set_ylabel("accuracy")
        acc.grid(True, which="both", alpha=0.3)
        acc.legend(loc="upper left", fontsize="small")
    (acc if accuracies else ax).set_xlabel("tokens")
    fig.tight_layout()
    return fig


def plot_history(source, out_png=None, width=8.0, height=4.5, dpi=100, required=True):
    """Write the loss plot of source (a run dir, a history .csv/.json, or Trainer.history) as a PNG; return its path.

    out_png defaults to loss.png beside the history file (in the run dir); the PNG is width*dpi x height*dpi pixels.
    With required=False a missing matplotlib is not an error: nothing is written and None returned.
    """
    if not required:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return None
    history = read_history(source)
    if out_png is None:
        if isinstance(source, (list, tuple)):
            raise ValueError("give out_png, the file to write, when plotting a history list")
        source = Path(source)
        out_png = (source if source.is_dir() else source.parent) / "loss.png"
    fig = _loss_figure(history, width, height, dpi)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out_png


def write_history(trainer, work_dir):
    """At the end of a run, finished or stopped: its history.csv in work_dir and, with matplotlib, loss.png beside it."""
    path = os.path.join(work_dir, "history.csv")
    trainer.save_history(path)
    plot_history(path, required=False)
    return path
