import csv
import json
import os
import struct
import sys
import tempfile
import unittest
from unittest import mock

from mygpt.plot import _loss_figure, plot_history

try:
    import matplotlib  # noqa: F401
except ImportError:
    matplotlib = None


def history(steps=50, eval_every=10, val_key="val_loss", tasks=()):
    """What a Trainer records: one row per step, a validation loss at every eval_every-th, and with it each task's
    accuracies as TaskCallback adds them."""
    rows = []
    for i in range(1, steps + 1):
        row = {"iter": i, "epoch": 1 + i // 20, "tokens": 512 * i, "lr": 6e-4 * min(1, i / 10),
               "loss": 4.0 / (1 + 0.1 * i)}
        if i % eval_every == 0:
            row[val_key] = 4.2 / (1 + 0.1 * i)
            for k, task in enumerate(tasks):
                row[f"{task}_acc"], row[f"{task}_acc_norm"] = 0.25 + i / 1000 + k / 10, 0.3 + i / 2000 + k / 10
        rows.append(row)
    return rows


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the PNG signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


@unittest.skipIf(matplotlib is None, "needs matplotlib (pip install 'mygpt[plot]')")
class TestPlot(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def write_csv(self, rows, path):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)

    def test_run_dir_gives_loss_png_of_the_asked_size(self):
        self.write_csv(history(), os.path.join(self.dir, "history.csv"))
        out = plot_history(self.dir)
        self.assertEqual(str(out), os.path.join(self.dir, "loss.png"))
        self.assertEqual(png_size(out), (800, 450))
        out = plot_history(os.path.join(self.dir, "history.csv"), os.path.join(self.dir, "small.png"),
                           width=4, height=3, dpi=50)
        self.assertEqual(png_size(out), (200, 150))

    def test_history_list_and_json(self):
        rows = history(val_key="test_loss")
        self.assertEqual(png_size(plot_history(rows, os.path.join(self.dir, "a.png"))), (800, 450))
        with open(os.path.join(self.dir, "h.json"), "w") as f:
            json.dump(rows, f)
        self.assertEqual(png_size(plot_history(os.path.join(self.dir, "h.json"))), (800, 450))
        with self.assertRaisesRegex(ValueError, "out_png"):
            plot_history(rows)

    def test_figure_holds_the_history(self):
        rows = history()
        for source in (rows, self.csv_rows(rows)):
            fig = _loss_figure(source)
            ax, lr_ax = fig.axes
            train, val = ax.get_lines()
            self.assertEqual(ax.get_xscale(), "log")
            self.assertEqual(list(train.get_xdata()), [r["tokens"] for r in rows])
            self.assertEqual(list(train.get_ydata()), [r["loss"] for r in rows])
            self.assertEqual(list(val.get_xdata()), [r["tokens"] for r in rows if "val_loss" in r])
            self.assertEqual(list(val.get_ydata()), [r["val_loss"] for r in rows if "val_loss" in r])
            self.assertEqual(list(lr_ax.get_lines()[0].get_ydata()), [r["lr"] for r in rows])

    def test_task_accuracies_get_a_panel_of_their_own(self):
        rows = history(tasks=("hellaswag", "piqa"))
        for source in (rows, self.csv_rows(rows)):
            fig = _loss_figure(source)
            ax, acc, lr_ax = fig.axes
            self.assertEqual([line.get_label() for line in ax.get_lines()], ["train loss", "validation loss"])
            self.assertEqual(acc.get_ylabel(), "accuracy")
            self.assertEqual((ax.get_xscale(), acc.get_xscale()), ("log", "log"))  # one tokens axis
            self.assertEqual(acc.get_xlabel(), "tokens")
            self.assertLess(acc.get_position().y1, ax.get_position().y0)  # below the losses
            lines = acc.get_lines()
            keys = ["hellaswag_acc", "hellaswag_acc_norm", "piqa_acc", "piqa_acc_norm"]
            self.assertEqual([line.get_label() for line in lines], keys)
            scored = [r for r in rows if "val_loss" in r]
            self.assertEqual(len(scored), 5)
            for line, key in zip(lines, keys):
                self.assertEqual(list(line.get_xdata()), [r["tokens"] for r in scored], key)
                self.assertEqual(list(line.get_ydata()), [r[key] for r in scored], key)
            self.assertEqual(list(lr_ax.get_lines()[0].get_ydata()), [r["lr"] for r in rows])
        self.assertEqual(png_size(plot_history(rows, os.path.join(self.dir, "acc.png"))), (800, 450))

    def csv_rows(self, rows):
        """The rows as csv.DictReader gives them back: strings, empty where a value is missing."""
        path = os.path.join(self.dir, "rows.csv")
        self.write_csv(rows, path)
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def test_errors(self):
        with self.assertRaisesRegex(FileNotFoundError, "history.csv"):
            plot_history(self.dir)
        with self.assertRaisesRegex(ValueError, "no rows with tokens and loss"):
            plot_history([{"iter": 1}], os.path.join(self.dir, "x.png"))
        self.assertEqual(os.listdir(self.dir), [])

    def test_missing_matplotlib_names_the_extra(self):
        with mock.patch.dict(sys.modules, {"matplotlib": None, "matplotlib.figure": None}):
            with self.assertRaisesRegex(ImportError, r"mygpt\[plot\]"):
                _loss_figure(history())


if __name__ == "__main__":
    unittest.main()
