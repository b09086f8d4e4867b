"""Fixtures that several test files share: tiny models, a temporary folder, the launchers of tests/trainer_run.py
(one process, torchrun with two, kill-and-resume), and q8, the reference of matvec's quantized x.

MYGPT_FAST_TESTS=1 skips the process-level tests (`@process_level`: ones that start Python processes, kill them,
run torchrun or train for many steps), so that the rest of the suite runs in about a minute on 2 cores:

    MYGPT_FAST_TESTS=1 python -m unittest discover tests
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import torch

from mygpt.checkpoint import load_checkpoint
from mygpt.model import GPT

FAST = os.environ.get("MYGPT_FAST_TESTS") == "1"
process_level = unittest.skipIf(FAST, "a process-level test: MYGPT_FAST_TESTS=1 skips it")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_run.py")

# the time-weighting variants every model test runs through
VARIANTS = [dict(time_weighting=tw, token_shift=ts, pos_emb=pe)
            for tw in (None, "full", "circulant") for ts in (False, True) for pe in (True, False)]


def tiny_config(**kw):
    """A GPT config small enough for a unit test: 2 layers, 4 heads, 32 wide, 13 tokens, block 16, no dropout."""
    c = GPT.get_default_config()
    c.n_layer, c.n_head, c.n_embd = 2, 4, 32
    c.vocab_size, c.block_size = 13, 16
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = 0.0
    c.merge_from_dict(kw)
    return c


def tiny_model(seed=0, random_time_weights=True, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw)).eval()
    if random_time_weights:  # ones would hide indexing mistakes
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "time_" in name:
                    p.uniform_(0.2, 1.8)
    return model


def detach_log_handlers():
    """Detach and close the "mygpt" logger's handlers: setup_logging's log.txt lies in a folder the test deletes,
    and a later test's log line would otherwise be written there."""
    logger = logging.getLogger("mygpt")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class TempDirTest(unittest.TestCase):
    def setUp(self):
        torch.set_num_threads(1)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)


def run_script(*args, **kwargs):
    """tests/trainer_run.py in one process."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kwargs)


CXX_ABORT = "terminate called without an active exception"


def torchrun(*args, restarts=0, timeout=240):
    """tests/trainer_run.py under torchrun with 2 processes (restarted up to `restarts` times).

    In about one CI run of the suite in four (two tests so far; never in 185 launches of the same run on a
    loaded 2-core machine here) a process has aborted in C++ with CXX_ABORT, which fails the launch. faulthandler's
    stack of one such abort had no Python frame left: the process had finished its run and was tearing down (after
    the Trainer's atexit destroy_process_group): it comes from what torch or gloo tear down at exit. Such a
    launch is run once more; what it printed goes to stderr, with each process's Python stack at the abort."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *([f"--max-restarts={restarts}"] if restarts else []), SCRIPT, *map(str, args)]
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    for attempt in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if attempt == 1 or done.returncode == 0 or CXX_ABORT not in done.stderr:
            return done
        print(f"\ntorchrun {' '.join(map(str, args))}: a process aborted ({CXX_ABORT}); launching once more. "
              f"It printed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}", file=sys.stderr)


def kill_and_resume(test, iters, *extra):
    """Run trainer_run.py's resume mode to iters twice (extra: its optional arguments), SIGKILL the second one
    mid-run, resume it to the end, and return the two final checkpoints (uninterrupted, resumed)."""
    reference = subprocess.Popen([sys.executable, SCRIPT, "resume", test.path("ref.pt"), str(iters), "0", *extra])
    victim = subprocess.Popen([sys.executable, SCRIPT, "resume", test.path("run.pt"), str(iters), "0.1", *extra])
    deadline = time.time() + 60
    while not os.path.exists(test.path("run.pt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    test.assertEqual(reference.wait(timeout=120), 0)
    killed_at = load_checkpoint(test.path("run.pt"))["iter_num"]
    test.assertLess(killed_at, iters)
    resumed = run_script("resume", test.path("run.pt"), iters, 0, *extra)
    test.assertEqual(resumed.returncode, 0, resumed.stderr)
    test.assertIn(f"resumed from {test.path('run.pt')} at iteration {killed_at}", resumed.stdout)
    ref, run = load_checkpoint(test.path("ref.pt")), load_checkpoint(test.path("run.pt"))
    test.assertEqual(run["iter_num"], iters)
    return ref, run


def q8(x):
    """x as matvec multiplies it with quantize_x: in blocks of 32, each step d = max |x| / 127, x = d round(x / d)
    (llama.cpp's q8_0), as doubles: (q (in,), d per element)."""
    q, d = [], []
    for block in x.split(32):
        step = block.abs().max() / 127
        q.append(torch.round(block / step) if step > 0 else torch.zeros_like(block))
        d.append(step.expand(len(block)))
    return torch.cat(q).double(), torch.cat(d).double()
