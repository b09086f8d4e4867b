"""
Decoding and training speed of two mygpt checkouts, measured alternately in fresh processes.

    git worktree add /tmp/mygpt-before <commit>
    OMP_NUM_THREADS=1 python bench/compare_checkouts.py /tmp/mygpt-before . --rounds=8

Each round runs one process per checkout (PYTHONPATH set to it) that times cached greedy generation of
200 tokens (batch 1) and a training step (forward + backward + AdamW, batch 16 x 128) at the seed's
shape: 3 layers, 8 heads, 512 wide, vocab 65, block 256, dropout 0, the head untied (so that a checkout
without weight tying builds the same network). It prints the medians and the ratio new / old.
"""

import argparse
import os
import statistics
import subprocess
import sys

PROBE = r"""
import statistics, time, torch
from mygpt.model import GPT  # not `from mygpt`: the first checkouts did not export GPT there
torch.set_num_threads(1)
c = GPT.get_default_config()
c.model_type = None
c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size = 3, 8, 512, 65, 256
c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = 0.0
if hasattr(c, "tie_weights"):
    c.tie_weights = False
torch.manual_seed(0)
model = GPT(c).eval()
prompt = torch.zeros(1, 1, dtype=torch.long)
model.generate(prompt, 50)
times = []
for _ in range(3):
    t = time.perf_counter(); model.generate(prompt, 200); times.append(time.perf_counter() - t)
generation = 200 / statistics.median(times)
model.train()
opt = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 65, (16, 128))
times = []
for i in range(4):
    t = time.perf_counter(); model(x, x)[1].backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(generation, 16 * 128 / statistics.median(times[1:]))
"""


def probe(checkout):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True).stdout
    return [float(v) for v in out.split()[-2:]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    results = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new"):
            results[name].append(probe(getattr(args, name)))
        print(f"round {r + 1}: old {results['old'][-1]}, new {results['new'][-1]}", flush=True)
    for i, what in enumerate(("cached generation, tokens/s", "training step, tokens/s")):
        old = statistics.median(v[i] for v in results["old"])
        new = statistics.median(v[i] for v in results["new"])
        print(f"{what:<30} old {old:8.1f}  new {new:8.1f}  new/old {new / old:.3f}")


if __name__ == "__main__":
    main()
