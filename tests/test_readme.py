"""The README's Python examples run as written, and its table of public names is mygpt.__all__.

The blocks run in order in one fresh process (later blocks use the names earlier ones define), in an
empty directory holding a small input.txt, with training shortened through the command-line overrides
that the training example reads. Blocks that need the network (GPT-2 weights from the hub, a download
from example.org) are left out: the tests of mygpt/pretrained.py and mygpt/downloads.py cover them offline.
"""

import os
import re
import subprocess
import sys
import tempfile
import unittest
from tests.helpers import process_level

import mygpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_NETWORK = ("from_pretrained(", 'download("https://')
OVERRIDES = ["--max_iters=2", "--batch_size=4"]


def python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@process_level
class TestReadme(unittest.TestCase):
    def test_python_examples_run(self):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            blocks = [b for b in python_blocks(f.read()) if not any(s in b for s in NEEDS_NETWORK)]
        self.assertGreaterEqual(len(blocks), 5)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "input.txt"), "w", encoding="utf-8") as f:
                f.write("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 100)
            script = os.path.join(tmp, "readme_examples.py")
            with open(script, "w", encoding="utf-8") as f:
                f.write("\n".join(blocks))
            env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
            run = subprocess.run([sys.executable, script, *OVERRIDES], cwd=tmp, env=env, capture_output=True,
                                 text=True, timeout=300)
            self.assertEqual(run.returncode, 0, run.stdout[-2000:] + run.stderr[-3000:])
            self.assertTrue(os.path.exists(os.path.join(tmp, "out", "ckpt.pt")))


    def test_the_api_table_lists_every_public_name(self):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            tour = f.read().split("## API tour", 1)[1].split("###", 1)[0]
        listed = re.findall(r"`(\w+)`", "".join(line for line in tour.splitlines(True) if line.startswith("| ")))
        self.assertEqual(sorted(listed), sorted(mygpt.__all__))


if __name__ == "__main__":
    unittest.main()
