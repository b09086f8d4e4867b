"""Small training runs that tests/test_trainer.py starts in subprocesses (and imports for its tiny model).

    python tests/trainer_run.py resume CKPT ITERS SLEEP [muon]   train with resume=True, a checkpoint every step
    torchrun --standalone --nproc_per_node=2 tests/trainer_run.py ddp OUTDIR ITERS   (resumes from OUTDIR)
    torchrun --standalone --nproc_per_node=2 --max-restarts=1 tests/trainer_run.py elastic OUTDIR ITERS KILL_AT
        the DDP run, in which rank 1 kills itself at step KILL_AT on the first attempt; torchrun restarts it
    python tests/trainer_run.py single OUTDIR ITERS       the DDP run's global batches in one process
    torchrun --standalone --nproc_per_node=2 tests/trainer_run.py disagree OUTDIR lr|resume   must refuse to start
    torchrun ... tests/trainer_run.py fsdp|fsdp_elastic OUTDIR ITERS [KILL_AT]   as ddp|elastic, sharded (FSDP2)
    (a last argument 'muon' trains TinyMLP with optimizer='muon' and the 'wsd' schedule in resume, ddp and single)
"""

import json
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mygpt.parallel import local_numel  # noqa: E402
from mygpt.trainer import Trainer  # noqa: E402

VOCAB, T = 16, 8


class TinyLM(nn.Module):
    """Embedding, dropout, linear: learns 'next token = token + 1' in a few dozen steps."""

    def __init__(self, dropout=0.1, width=32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x, y=None):
        logits = self.head(self.drop(self.emb(x)))
        loss = None
        if y is not None:
            loss = F.cross_entropy(logits.view(-1, VOCAB), y.view(-1), ignore_index=-1)
        return logits, loss


class TinyMLP(TinyLM):
    """TinyLM with a residual hidden layer between the embedding and the head: a hidden matrix for Muon."""

    def __init__(self, dropout=0.1, width=32):
        super().__init__(dropout, width)
        self.hidden = nn.Linear(width, width)

    def forward(self, x, y=None):
        h = self.emb(x)
        h = h + F.relu(self.hidden(h))
        logits = self.head(self.drop(h))
        loss = None
        if y is not None:
            loss = F.cross_entropy(logits.view(-1, VOCAB), y.view(-1), ignore_index=-1)
        return logits, loss


def muon_overrides(args):
    """Trainer overrides and the model class for a run whose last argument may be 'muon'."""
    if args and args[-1] == "muon":
        return dict(optimizer="muon", lr_schedule="wsd", muon_momentum_warmup=5), TinyMLP
    return {}, TinyLM


class CountingData(torch.utils.data.Dataset):
    """x is a run of consecutive tokens, y the next ones; a varying number of targets are -1 (ignored),
    so batches differ in token count, which is what makes loss weighting matter."""

    def __init__(self, n=256):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = (torch.arange(T) + i) % VOCAB
        y = (x + 1) % VOCAB
        y[: i % 5] = -1
        return x, y


def config(**overrides):
    C = Trainer.get_default_config()
    C.device = "cpu"
    C.quiet = True
    C.log_interval = 0
    C.batch_size = 8
    C.learning_rate = 1e-2
    C.precision = "fp32"  # the default 'auto' may time its way to bf16 on a bf16 CPU; these runs compare numbers
    C.merge_from_dict(overrides)
    return C


def tiny_gpt():
    from mygpt.model import GPT
    C = GPT.get_default_config()
    C.n_layer, C.n_head, C.n_embd, C.vocab_size, C.block_size = 2, 2, 32, VOCAB, T
    C.embd_pdrop = C.resid_pdrop = C.attn_pdrop = 0.0
    C.time_weighting, C.token_shift = "circulant", True
    return GPT(C)


def main(mode, *args):
    torch.set_num_threads(1)
    if mode == "resume":
        ckpt, iters, sleep = args[0], int(args[1]), float(args[2])
        overrides, model_class = muon_overrides(args[3:])
        torch.manual_seed(0)
        C = config(max_iters=iters, ckpt_path=ckpt, ckpt_interval=1, resume=True, grad_accum_steps=2,
                   lr_decay=True, warmup_tokens=200, final_tokens=4000, **overrides)
        trainer = Trainer(C, model_class(dropout=0.1), CountingData(100))
        trainer.add_callback("on_batch_end", lambda t: time.sleep(sleep))
        trainer.run()
    elif mode in ("ddp", "single", "elastic", "fsdp", "fsdp_elastic", "single_gpt"):
        outdir, iters = args[0], int(args[1])
        overrides, model_class = muon_overrides(args[2:])
        rank = int(os.environ.get("RANK", "0"))
        torch.manual_seed(100 + rank)  # the ranks start from different weights; DDP must align them
        single = mode.startswith("single")
        batch = 16 if single else 4  # 4 per micro-batch x 2 micro-batches x 2 processes
        C = config(max_iters=iters, batch_size=batch, grad_accum_steps=1 if single else 2,
                   ckpt_path=os.path.join(outdir, f"{mode}.ckpt"), resume=True,
                   ckpt_interval=1 if mode.endswith("elastic") else 0, parallel="fsdp" if "fsdp" in mode else "ddp",
                   **overrides)
        # 96 examples are 6 whole steps an epoch: there one process and two take the same examples (with a
        # remainder, one process ends the epoch with a short batch, DDP fills its last step up)
        # the sharded runs train a GPT (blocks in a ModuleList, a tied head, time weighting and token shift)
        model = tiny_gpt() if "fsdp" in mode or mode == "single_gpt" else model_class(dropout=0.0)
        trainer = Trainer(C, model, CountingData(96))
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if mode.endswith("elastic") and rank == 1 and first_attempt:
            kill_at = int(args[2])
            trainer.add_callback("on_batch_end",
                                 lambda t: os.kill(os.getpid(), signal.SIGKILL) if t.iter_num == kill_at else None)
        trainer.run()
        weights = trainer.state_dict()["model"]  # whole tensors (on rank 0 alone when sharded)
        if weights:
            torch.save(weights, os.path.join(outdir, f"{mode}{rank}.pt"))
        if rank == 0:
            trainer.save_history(os.path.join(outdir, f"{mode}.json"))
        if "fsdp" in mode:  # what this process stores: a shard of the weights and of the optimizer state
            state = [t for s in trainer.optimizer.state.values() for t in s.values()]
            stored = {"params": local_numel(trainer.model.parameters()), "optimizer": local_numel(state),
                      "whole": sum(p.numel() for p in trainer.model.parameters())}
            with open(os.path.join(outdir, f"{mode}{rank}.json"), "w") as f:
                json.dump(stored, f)
    elif mode == "disagree":  # rank 1 is given another learning rate, or a checkpoint that rank 0 lacks
        outdir, case = args
        rank = int(os.environ.get("RANK", "0"))
        # on one machine, a checkpoint only rank 1 sees takes another path
        ckpt = os.path.join(outdir, f"disagree{rank if case == 'resume' else ''}.pt")
        if case == "resume" and rank == 1:
            torch.save({}, ckpt)
        C = config(max_iters=2, ckpt_path=ckpt, resume=True,
                   learning_rate=2e-2 if case == "lr" and rank == 1 else 1e-2)
        Trainer(C, TinyLM(), CountingData(96)).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
