"""
Memory per process under DDP and FSDP (Trainer(parallel='fsdp')): 2 CPU processes with gloo, a GPT-2 shaped model,
two optimizer steps of one short sequence each, so that weights, gradients and AdamW's moments all exist.

    python bench/bench_fsdp.py                         # gpt2-medium (350M parameters): about 14 GB of RAM for DDP
    python bench/bench_fsdp.py --model_type=gpt2       # 124M, for a smaller machine

Both modes run with glibc's MALLOC_MMAP_THRESHOLD_=1 MiB (see ENV). Prints, for each mode, what each process stores (elements of weights and optimizer state, its share of the whole)
and its peak resident memory, then FSDP's peak as a fraction of DDP's.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

from mygpt import GPT, Trainer
from mygpt.parallel import local_numel  # what one process holds of a sharded tensor: the measurement, not an API


# glibc keeps freed blocks of up to 32 MB in its heap once one was freed, so a process's resident memory
# stays at its high-water mark: buffers an all-gather frees come back only if they were mapped on their own
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}


class OneSequence(torch.utils.data.Dataset):
    def __init__(self, n, block, vocab):
        self.x = torch.randint(0, vocab, (n, block + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i, :-1], self.x[i, 1:]


def worker(args):
    torch.set_num_threads(1)
    mc = GPT.get_default_config()
    mc.model_type, mc.vocab_size, mc.block_size = args.model_type, 50257, 64
    torch.manual_seed(0)
    model = GPT(mc)
    tc = Trainer.get_default_config()
    tc.device, tc.max_iters, tc.batch_size, tc.quiet, tc.log_interval = "cpu", 2, 1, True, 0
    tc.parallel = args.parallel
    tc.precision = "fp32"  # the README's figures are fp32's ('auto', the default, may take bf16)
    trainer = Trainer(tc, model, OneSequence(8, 64, 50257))
    trainer.run()
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    report = {"params": local_numel(trainer.model.parameters()), "optimizer": local_numel(state),
              "whole": sum(p.numel() for p in trainer.model.parameters()),
              "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    with open(os.path.join(args.out, f"{args.parallel}{os.environ['RANK']}.json"), "w") as f:
        json.dump(report, f)


def main(args):
    out = tempfile.mkdtemp()
    peaks = {}
    print(f"{args.model_type}, 2 CPU processes (gloo), torch {torch.__version__}")
    for parallel in ("ddp", "fsdp"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.abspath(__file__), "--worker", f"--parallel={parallel}", f"--out={out}",
                        f"--model_type={args.model_type}"], check=True, env=dict(os.environ, **ENV))
        for rank in (0, 1):
            with open(os.path.join(out, f"{parallel}{rank}.json")) as f:
                r = json.load(f)
            peaks.setdefault(parallel, []).append(r["peak_gib"])
            print(f"{parallel:4} rank {rank}: weights {r['params'] / 1e6:7.1f}M ({r['params'] / r['whole']:.0%} of "
                  f"{r['whole'] / 1e6:.1f}M), optimizer state {r['optimizer'] / 1e6:7.1f}M, "
                  f"peak resident {r['peak_gib']:.2f} GiB")
    print(f"FSDP / DDP peak resident memory per process: {max(peaks['fsdp']) / max(peaks['ddp']):.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default="gpt2-medium")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    worker(a) if a.worker else main(a)
