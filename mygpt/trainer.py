"""The training loop: any model whose ``forward(x, y)`` returns ``(logits, loss)``, from a laptop CPU to
many GPUs on several machines under ``torchrun``.

What it guarantees, and how:

- The data order is a pure function of ``(seed, epoch, position)`` (mygpt/order.py), computed a step at a
  time, so a checkpoint names exactly which example comes next and nothing proportional to the dataset
  is ever built: an epoch over 10^10 windows starts at once.
- A checkpoint holds everything that decides the future of the run (weights, optimizer, grad scaler,
  schedule position, sampler position, every RNG state) and is written atomically (mygpt/checkpoint.py).
  On CPU a resumed run ends bit-identical to one that was never interrupted. A run never overwrites a
  checkpoint it did not resume, unless told to.
- Gradients are weighted by token counts, so k accumulated micro-batches, or n processes, compute the
  same update as one large batch.
- On one GPU the host never waits for the device inside a step: batches are checked on the host (by the
  model's ``check_batch(x, y)`` where it has one: GPT refuses ids outside its vocabulary), copied
  from pinned memory without blocking, and the loss is read every log_interval steps (a non-finite loss
  makes the fused optimizer skip its update on the device, and the next read stops the run).
"""

import atexit
import csv
import gc
import hashlib
import json
import logging
import math
import numbers
import os
import signal
import threading
import uuid
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mygpt import precision
from mygpt.checkpoint import (CheckpointError, check_writable, load_checkpoint, load_model_state, rng_state,
                              run_id_of, save_checkpoint, set_rng_state, strip_compile_prefix, train_config_of)
from mygpt.compiled import Compiled
from mygpt.evaluate import Score, score_batches
from mygpt.muon import MuonAdamW, configure_muon, muon_momentum
from mygpt.order import EpochOrder, epoch_batches, micro_batches_in_step
from mygpt.parallel import PARALLEL, full_state, load_full_state, no_gradient_sync, shard
from mygpt.precision import PRECISIONS
from mygpt.tokenizer import load_tokenizer, record_tokenizer
from mygpt.utils import CfgNode, atomic_path, check_device, resolve_device, set_seed

_EVENTS = ("on_batch_end", "on_epoch_end", "on_eval_end")
_EVAL_ORDERS = ("random", "first")
_TRAIN_ORDER, _VAL_ORDER = 0, 1  # tags that keep the train and validation orders independent
_TRAINER_KEYS = ("model", "optimizer", "iter_num", "tokens", "epoch", "epoch_samples", "rng", "run_id")
_MIN_LR_FRACTION = 0.1  # the cosine's floor, as a fraction of learning_rate
_LR_SCHEDULES = ("mingpt", "nanogpt", "wsd")
_OPTIMIZERS = ("adamw", "muon")
# model config fields that choose how the same function is computed: they may change when a run resumes
_RESUMABLE_MODEL_FIELDS = ("attention",)


def _scheduled_lr(config, tokens, peak=None):
    """The learning rate after ``tokens`` target tokens: linear warmup over warmup_tokens, then a cosine over
    progress p in [0, 1] up to final_tokens, held at 10% of learning_rate after it. Two cosines:

        'mingpt'  (the default; the seed's log was made with it):  lr · max(0.1, ½(1 + cos πp))
        'nanogpt' (nanoGPT's get_lr):                             lr · (0.1 + 0.9 · ½(1 + cos πp))

    minGPT's reaches the floor at p ≈ 0.8 and stays there; nanoGPT's reaches it exactly at final_tokens.
    'wsd' (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; nanochat, modded-nanogpt) holds lr flat after the
    warmup, then cools down linearly over the last cooldown_fraction of the tokens after it, to
    cooldown_floor · lr at final_tokens (and stays there):

        'wsd':  lr · (1 - (1 - cooldown_floor) · c),   c = cooldown progress in [0, 1]

    peak replaces learning_rate for an optimizer group with a learning rate of its own (optimizer='muon').
    """
    peak = config.learning_rate if peak is None else peak
    if not config.lr_decay:
        return peak
    if tokens < config.warmup_tokens:
        return peak * tokens / max(1, config.warmup_tokens)
    if config.lr_schedule == "wsd":
        cooldown = config.cooldown_fraction * (config.final_tokens - config.warmup_tokens)  # tokens
        progress = (tokens - (config.final_tokens - cooldown)) / max(1, cooldown)
        return peak * (1.0 - (1.0 - config.cooldown_floor) * min(max(progress, 0.0), 1.0))
    progress = (tokens - config.warmup_tokens) / max(1, config.final_tokens - config.warmup_tokens)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0, then held at 0
    if config.lr_schedule == "nanogpt":
        return peak * (_MIN_LR_FRACTION + (1.0 - _MIN_LR_FRACTION) * cosine)
    return peak * max(_MIN_LR_FRACTION, cosine)


def check_new_run(config, *other_files):
    """Raise FileExistsError when config.ckpt_path, or another file of the run (a best.pt, say), holds an earlier
    run that config neither resumes nor overwrites. Scripts call it before they write anything to a work dir."""
    resuming = config.resume and config.ckpt_path and os.path.exists(config.ckpt_path)
    earlier = [p for p in (config.ckpt_path, *other_files) if p and os.path.exists(p)]
    if earlier and not resuming and not config.overwrite:
        raise FileExistsError(
            f"{' and '.join(map(str, earlier))} already hold{'s' if len(earlier) == 1 else ''} a checkpoint of an "
            f"earlier run. To continue that run, set resume=True (--trainer.resume=True); to keep it and start anew, "
            f"choose another ckpt_path or work dir (--system.work_dir=...); to replace it, set overwrite=True "
            f"(--trainer.overwrite=True)")


def _plain_config(config):
    """A config as JSON-safe values, so that weights_only loading accepts it whatever the user put in."""
    return json.loads(config.to_json())


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fingerprint(dataset):
    """Length and a hash of the first and last examples: enough to tell two datasets apart cheaply."""
    digest = hashlib.sha256()
    for i in {0, len(dataset) - 1}:
        for t in dataset[i]:
            digest.update(torch.as_tensor(t).cpu().contiguous().numpy().tobytes())
    return f"{len(dataset):,} examples, sha256 {digest.hexdigest()[:16]}"


def _targets_in(example):
    """The number of targets (y >= 0) in one (x, y) example."""
    return int((example[1] >= 0).sum())


class Trainer:
    """Trains ``model`` on ``train_dataset``; ``run()`` it, read its state, hook callbacks into it."""

    @staticmethod
    def get_default_config():
        C = CfgNode()
        C.device = "auto"            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
        C.num_workers = 0            # DataLoader worker processes; 0 is always safe (and needed on Windows)
        C.max_iters = None           # stop after this many optimizer steps ...
        C.max_epochs = None          # ... or epochs (the first reached); with neither, train until Ctrl-C
        C.batch_size = 64            # examples per micro-batch per process
        C.learning_rate = 3e-4
        C.betas = (0.9, 0.95)
        C.weight_decay = 0.1         # read by the model's configure_optimizers, or the plain AdamW
        C.grad_norm_clip = 1.0       # None or 0 turns clipping off
        C.lr_decay = False           # warmup then cosine decay to 10%, counted in target tokens
        C.lr_schedule = "mingpt"     # see _scheduled_lr: 'mingpt' (the seed's cosine), 'nanogpt' or 'wsd'
        C.cooldown_fraction = 0.4    # 'wsd': the last fraction of the run (after warmup) that cools down ...
        C.cooldown_floor = 0.0       # ... linearly to this fraction of each learning rate
        C.optimizer = "adamw"        # 'adamw', or 'muon': Muon for hidden matrices, AdamW for the rest (mygpt/muon.py)
        C.muon_lr = 0.02             # Muon's learning rate (modded-nanogpt's, nanochat's); AdamW's is learning_rate
        C.muon_momentum = 0.95       # Muon's momentum, reached after ...
        C.muon_momentum_warmup = 300  # ... this many steps, linearly from 0.85 (modded-nanogpt); 0: from the start
        C.muon_weight_decay = 0.0    # Muon's decoupled weight decay (AdamW's is weight_decay)
        C.warmup_tokens = None       # None: the first 5% of final_tokens
        C.final_tokens = None        # None: where max_iters / max_epochs ends the run
        C.grad_accum_steps = 1       # micro-batches per optimizer step
        C.precision = "auto"         # 'auto' (mygpt/precision.py: bf16 where native and faster on this model, else
                                     # fp32), 'fp32', 'bf16' or 'fp16' (autocast; fp16 adds a grad scaler)
        C.compile = False            # torch.compile the model (eager mode, said in one line, if that fails)
        C.parallel = "ddp"           # under torchrun: 'ddp' (whole model per process) or 'fsdp' (mygpt/parallel.py)
        C.ckpt_path = None           # where checkpoints go; None writes none
        C.ckpt_interval = 0          # also every this many steps (0: only at the end and on Ctrl-C/SIGTERM)
        C.resume = False             # continue from ckpt_path when it exists
        C.overwrite = False          # replace a checkpoint at ckpt_path that this run did not resume
        C.eval_interval = 500        # validation loss every this many steps and at the last, with a val set (0: never)
        C.eval_iters = 20            # batches per process in one evaluation
        C.eval_order = "random"      # which val examples: 'random' (a fixed random sample) or 'first' (the first ones
                                     # in order: consecutive windows of a corpus); the same ones each evaluation
        C.eval_bits_per_byte = False  # also val_bpb: bits per byte of the val targets (needs tokenizer= to count them)
        C.eval_at_start = False      # also evaluate before the first step (logged; the history starts at step 1)
        C.seed = 1337                # decides the RNGs at the start and the data order of every epoch
        C.quiet = False              # no progress bar: a plain line every log_interval steps, for log files
        C.log_interval = 100         # steps between training-loss lines in the log (0: none)
        return C

    def __init__(self, config, model, train_dataset, val_dataset=None, tokenizer=None):
        self.config = config = CfgNode(**config.to_dict())  # the schedule filled in below stays ours
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        # how text becomes the model's tokens, recorded in every checkpoint so that tools can read and
        # write text with it: the record of mygpt.tokenizer, which prepare_corpus writes into meta.json too
        self.tokenizer = record_tokenizer(tokenizer)
        self.callbacks = {event: [] for event in _EVENTS}
        self.log = logging.getLogger("mygpt")
        self._check_config()
        self._byte_counter = self._tokenizer_for_bytes()
        self._check_dataset(train_dataset, "train_dataset")
        if val_dataset is not None:
            self._check_dataset(val_dataset, "val_dataset")

        self._setup_distributed()
        self._check_ranks_agree(model)
        self.model = model.to(self.device)
        self.sharded = self.world_size > 1 and config.parallel == "fsdp"
        if self.sharded:
            shard(self.model)  # before the optimizer, which must hold the sharded parameters
        self.optimizer = self._make_optimizer()
        self._resolve_precision()
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=config.precision == "fp16")
        self._autocast_dtype = PRECISIONS[config.precision]
        # compiled at the first step; a compile that fails there falls back to eager mode (mygpt/compiled.py)
        self._compiled = None
        if config.compile:
            self._compiled = Compiled(self.model, "the model", warn=self._print, on_failure=self._wrap_model)
        self._wrap_model()
        if config.parallel == "fsdp" and self.world_size == 1:
            self._print("parallel='fsdp' with one process: nothing to shard, training as a single process")
        self._check_batch_size()
        self._fill_schedule()

        self.iter_num = 0            # optimizer steps done
        self.tokens = 0              # target tokens (y >= 0) seen, over all processes
        self.epoch = 0               # epochs completed
        self.epoch_samples = 0       # examples of the current epoch's order already used
        self.lr = _scheduled_lr(config, 0)
        self._loss = None            # the last step's training loss, read through .loss
        self._history = []           # read through .history
        self._pending = []           # losses still on the device (see _deferred)
        # On a GPU, reading the loss every step would stall the host until the device catches up. With a
        # fused optimizer, which can skip an update on the device, losses are read every log_interval
        # steps instead; elsewhere (and with fp16's grad scaler, or several processes) every step.
        self._deferred = (self.device_type == "cuda" and self.world_size == 1 and config.precision != "fp16"
                          and all(g.get("fused") for g in self.optimizer.param_groups))
        self.run_id = uuid.uuid4().hex  # names this run in its checkpoints; a resume keeps it
        self.interrupted = False
        self._stop_requested = False  # set by Ctrl-C or SIGTERM in this process
        self._stop_agreed = False     # set when any process had one, at the same step everywhere
        self._saved_iter = None      # the step of the last checkpoint, to avoid writing it twice

        self._prepare_checkpoint_path()
        if config.resume and config.ckpt_path and os.path.exists(config.ckpt_path):
            self._resume(config.ckpt_path)
        else:
            set_seed(config.seed + self.rank)  # each process its own dropout; the data order is shared

    # ---------------------------------------------------------------- setup

    def _check_config(self):
        C = self.config

        def positive_int(key, allow_none=False, allow_zero=False):
            value = getattr(C, key)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if allow_zero else 1):
                kind = "an int >= 0" if allow_zero else "a positive int"
                raise ValueError(f"trainer config {key} must be {kind}{' or None' if allow_none else ''}, got {value!r}")
            setattr(C, key, int(value))  # a numpy integer becomes a plain int, as checkpoints store it

        for key in ("batch_size", "grad_accum_steps", "eval_iters"):
            positive_int(key)
        for key in ("max_iters", "max_epochs"):
            positive_int(key, allow_none=True, allow_zero=True)
        for key in ("num_workers", "ckpt_interval", "eval_interval", "log_interval", "seed"):
            positive_int(key, allow_zero=True)
        for key, choices in (("lr_schedule", _LR_SCHEDULES), ("parallel", PARALLEL),
                             ("precision", (*PRECISIONS, "auto")), ("optimizer", _OPTIMIZERS),
                             ("eval_order", _EVAL_ORDERS)):
            if getattr(C, key) not in choices:
                raise ValueError(f"{key} must be one of {list(choices)}, got {getattr(C, key)!r}")
        if C.parallel == "fsdp" and C.precision == "fp16":
            raise ValueError("parallel='fsdp' takes precision 'fp32' or 'bf16' (fp16's grad scaler is not sharded); "
                             "use precision='bf16'")
        if C.optimizer == "muon" and C.parallel == "fsdp":
            raise ValueError("optimizer='muon' orthogonalises whole matrices, and parallel='fsdp' shards them across "
                             "processes: use parallel='ddp' with Muon, or optimizer='adamw' with FSDP")
        for key in ("cooldown_fraction", "cooldown_floor"):
            value = getattr(C, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
        for key in ("muon_lr", "muon_weight_decay"):
            value = getattr(C, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        if isinstance(C.muon_momentum, bool) or not (isinstance(C.muon_momentum, (int, float))
                                                     and 0 <= C.muon_momentum < 1):
            raise ValueError(f"muon_momentum must be a number in [0, 1), got {C.muon_momentum!r}")
        positive_int("muon_momentum_warmup", allow_zero=True)
        if not (isinstance(C.learning_rate, (int, float)) and C.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a number >= 0, got {C.learning_rate!r}")
        if C.grad_norm_clip is not None and not (isinstance(C.grad_norm_clip, (int, float)) and C.grad_norm_clip >= 0):
            raise ValueError(f"grad_norm_clip must be None or a number >= 0 (0 turns clipping off), "
                             f"got {C.grad_norm_clip!r}")
        if not (isinstance(C.betas, (tuple, list)) and len(C.betas) == 2 and all(0 <= b < 1 for b in C.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {C.betas!r}")
        for key in ("warmup_tokens", "final_tokens"):
            value = getattr(C, key)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{key} must be None or a number of tokens >= 0, got {value!r}")
        if C.lr_decay and C.final_tokens is None and C.max_iters is None and C.max_epochs is None:
            raise ValueError("lr_decay=True needs to know where the run ends: set max_iters or max_epochs "
                             "(or final_tokens)")
        if C.ckpt_path is not None and not isinstance(C.ckpt_path, (str, os.PathLike)):
            raise TypeError(f"ckpt_path must be a file name (str) or None, got {C.ckpt_path!r}")
        check_device(C.device, "trainer config device")  # before a run starts, not at its first tensor
        if C.resume and C.overwrite:
            raise ValueError("resume=True and overwrite=True contradict each other; choose one")

    def _tokenizer_for_bytes(self):
        """The run's tokenizer, which counts the bytes of the val targets for eval_bits_per_byte (else None)."""
        if not self.config.eval_bits_per_byte:
            return None
        if self.tokenizer is None:
            raise ValueError("eval_bits_per_byte=True counts the bytes of the validation targets with the run's "
                             "tokenizer: pass Trainer(..., tokenizer=mygpt.describe_tokenizer(...))")
        return load_tokenizer(self.tokenizer)

    def _check_batch_size(self):
        """A step never takes an example twice: alone, a batch beyond the dataset is the whole dataset (said once);
        with several processes, whose steps are filled up to equal batches, it is refused."""
        n, wanted = len(self.train_dataset), self.global_batch
        if wanted <= n:
            return
        if self.world_size > 1:
            raise ValueError(f"a step of batch_size x grad_accum_steps x {self.world_size} processes = {wanted:,} "
                             f"examples is more than the {n:,} of train_dataset; lower batch_size to at most "
                             f"{n // (self.config.grad_accum_steps * self.world_size):,}")
        self._print(f"batch_size x grad_accum_steps = {wanted:,} is more than the {n:,} examples of train_dataset: "
                    f"each step takes the whole dataset once")

    @staticmethod
    def _check_dataset(dataset, name):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"{name} must be a map-style dataset with __len__ and __getitem__")
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty: it has no examples (is the text shorter than one block?)")

    def _setup_distributed(self):
        """Under torchrun (WORLD_SIZE > 1) join the process group; otherwise run alone."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        device = resolve_device(self.config.device)
        if self.world_size > 1:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device.startswith("cuda"):
                device = f"cuda:{local_rank}"
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                        **_restart_safe_store(self.rank, self.world_size))
                # leave the group in order before the interpreter tears down: a process that exits
                # while gloo's threads still run can abort after a run that succeeded
                atexit.register(_leave_process_group)
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.is_main = self.rank == 0
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fp32 accuracy for training, 2-8x faster
            torch.backends.cudnn.allow_tf32 = True

    def _wrap_model(self):
        """The module a step calls: the model (compiled, unless that failed), in DDP under torchrun unless sharded."""
        self._forward_model = self.model if self._compiled is None else self._compiled.fn
        self._no_sync = nullcontext  # how a micro-batch before the step's last keeps its gradient local
        if self.sharded:
            self._no_sync = lambda: no_gradient_sync(self.model)
        elif self.world_size > 1:
            device_ids = [self.device.index] if self.device_type == "cuda" else None
            self._forward_model = DistributedDataParallel(self._forward_model, device_ids=device_ids)
            self._no_sync = self._forward_model.no_sync

    def _check_ranks_agree(self, model):
        """Under torchrun, refuse before anything runs when the processes were given different configs, models,
        data or checkpoints to resume: they would train apart in silence, or wait on each other forever."""
        if self.world_size == 1:
            return
        C = self.config
        resume_from = C.ckpt_path if C.resume and C.ckpt_path and os.path.exists(C.ckpt_path) else None
        record = {f"trainer.{k}": v for k, v in _plain_config(C).items() if k != "device"}
        model_config = getattr(model, "config", None)
        if hasattr(model_config, "to_json"):
            record.update({f"model.{k}": v for k, v in _plain_config(model_config).items()})
        record.update({"train_dataset": _fingerprint(self.train_dataset),
                       "val_dataset": None if self.val_dataset is None else _fingerprint(self.val_dataset),
                       "tokenizer": self.tokenizer,
                       "resumes from": resume_from and f"{resume_from} (run {run_id_of(resume_from)})"})
        records = [None] * self.world_size
        dist.all_gather_object(records, record)  # every process gets every record: all refuse alike
        for rank, other in enumerate(records):
            differing = [k for k in sorted(set(records[0]) | set(other)) if records[0].get(k) != other.get(k)]
            if differing:
                k = differing[0]
                raise ValueError(f"processes 0 and {rank} differ in {', '.join(differing)} ({k}: "
                                 f"{records[0].get(k)!r} vs {other.get(k)!r}); every process of a run needs the "
                                 f"same config, data and checkpoint")

    def _resolve_precision(self):
        """Turn precision='auto' into 'fp32' or 'bf16' (said once, and kept in the checkpoints, so a resumed run
        computes as it did); warn once about a low precision this device only emulates."""
        C = self.config
        if C.precision != "auto":
            dtype = PRECISIONS[C.precision]
            if dtype is not None and not precision.native(self.device_type, dtype):
                self._print(f"warning: precision={C.precision!r}, but this {self.device_type} has no native "
                            f"{C.precision}: it is emulated and can be many times slower than fp32; "
                            f"precision='auto' uses it only where it pays")
            return
        resumed = None
        if C.resume and C.ckpt_path and os.path.exists(C.ckpt_path):
            resumed = (train_config_of(C.ckpt_path) or {}).get("precision")
        if resumed in PRECISIONS:
            choice, why = resumed, "as the run it resumes"
        else:
            batch = []  # the first batch, read at the first step of the probe (choose may decide without one)

            def step(dtype):
                if not batch:
                    n = len(self.train_dataset)
                    first = next(iter(self._loader(self.train_dataset, [list(range(min(C.batch_size, n)))])))
                    batch.extend(self._to_device(*self._check_batch(first)))
                with precision.autocast(self.device_type, dtype):
                    _, loss = self.model(*batch)
                loss.float().backward()
                self.model.zero_grad(set_to_none=True)
            choice, why = precision.choose(self.device_type, step, sum(p.numel() for p in self.model.parameters()))
            # every process computes as rank 0 chose
            choice = "bf16" if self._all_reduce([choice == "bf16" and self.is_main])[0] else "fp32"
        C.precision = choice
        self._print(f"precision='auto': {choice} ({why})")

    def _make_optimizer(self):
        if self.config.optimizer == "muon":
            return configure_muon(self.model, self.config)
        if hasattr(self.model, "configure_optimizers"):
            return self.model.configure_optimizers(self.config)
        C = self.config
        return torch.optim.AdamW(self.model.parameters(), lr=C.learning_rate, betas=C.betas,
                                 weight_decay=C.weight_decay)

    def _fill_schedule(self):
        """Complete a schedule left open: final_tokens where max_iters/max_epochs ends the run, warmup over
        its first 5%. The tokens of an example are estimated from the first example's target count."""
        C = self.config
        if C.final_tokens is None:
            steps = [n for n in (C.max_iters, C.max_epochs and C.max_epochs * self.steps_per_epoch())
                     if n is not None]
            if steps:
                C.final_tokens = self.examples_in_steps(min(steps)) * _targets_in(self.train_dataset[0])
        if C.warmup_tokens is None and C.final_tokens is not None:
            C.warmup_tokens = C.final_tokens // 20
        if C.lr_decay and C.lr_schedule == "wsd":
            self._print(f"schedule: warmup over {C.warmup_tokens:,.0f} tokens, flat, then a linear cooldown over the "
                        f"last {C.cooldown_fraction:g} to {C.cooldown_floor:g} of each learning rate by "
                        f"{C.final_tokens:,.0f} tokens")
        elif C.lr_decay:
            self._print(f"schedule: warmup over {C.warmup_tokens:,.0f} tokens, {C.lr_schedule}'s cosine to "
                        f"{_MIN_LR_FRACTION * C.learning_rate:g} by {C.final_tokens:,.0f} tokens")

    def _prepare_checkpoint_path(self):
        """Refuse, before the first step, a checkpoint path that cannot be written or holds another run."""
        C = self.config
        if not C.ckpt_path:
            return
        if self.is_main:
            check_writable(C.ckpt_path)
        if C.resume and not os.path.exists(C.ckpt_path):
            self._print(f"resume=True but there is no checkpoint at {C.ckpt_path} yet: starting a new run")
        check_new_run(C)

    # ---------------------------------------------------------------- callbacks

    def add_callback(self, event, fn):
        self._event_list(event).append(fn)

    def set_callback(self, event, fn):
        self._event_list(event)[:] = [fn]

    def trigger_callbacks(self, event):
        for fn in self._event_list(event):
            fn(self)

    def _event_list(self, event):
        if event not in self.callbacks:
            raise ValueError(f"unknown event {event!r}; events are {list(_EVENTS)}")
        return self.callbacks[event]

    # ---------------------------------------------------------------- data

    @property
    def global_batch(self):
        """Examples per optimizer step, over all micro-batches and processes."""
        return self.config.batch_size * self.config.grad_accum_steps * self.world_size

    def steps_per_epoch(self):
        return math.ceil(len(self.train_dataset) / self.global_batch)

    def examples_in_steps(self, steps):
        """Examples that the first `steps` optimizer steps of a run take: each example once an epoch, a short
        last batch ending it when alone; with several processes every step is whole (order.epoch_batches)."""
        if self.world_size > 1:
            return steps * self.global_batch
        epochs, rest = divmod(steps, self.steps_per_epoch())
        return epochs * len(self.train_dataset) + min(rest * self.global_batch, len(self.train_dataset))

    def _epoch_batches(self, epoch, start):
        """This process's micro-batches for the rest of ``epoch``, from example ``start`` (see order.epoch_batches)."""
        C = self.config
        order = EpochOrder(C.seed, epoch, len(self.train_dataset), tag=_TRAIN_ORDER)
        return epoch_batches(order, start, C.batch_size, C.grad_accum_steps, self.world_size, self.rank)

    def _loader(self, dataset, batches):
        # a private generator: creating a DataLoader iterator would otherwise draw from the global RNG,
        # and a resumed run creates its iterator at a point where the uninterrupted one did not
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.config.num_workers,
                          pin_memory=self.device_type == "cuda", generator=torch.Generator())

    def _check_batch(self, batch):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and torch.is_tensor(batch[0]) and torch.is_tensor(batch[1])):
            shape = [type(b).__name__ for b in batch] if isinstance(batch, (tuple, list)) else type(batch).__name__
            raise TypeError(f"the dataset must yield (x, y) pairs of tensors; a batch came out as {shape}")
        x, y = batch
        if hasattr(self.model, "check_batch"):
            self.model.check_batch(x, y)  # on the host, where it costs no device sync, and before any step uses it
        return x, y

    def _to_device(self, x, y):
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # ---------------------------------------------------------------- the loop

    def run(self):
        """Train until max_iters or max_epochs (or Ctrl-C/SIGTERM, which save a checkpoint and return)."""
        self.interrupted = self._stop_requested = self._stop_agreed = False
        if self._finished():
            self._print(f"nothing to do: the run is already at iteration {self.iter_num} (epoch {self.epoch}), "
                        f"where max_iters/max_epochs end it; raise them to train further")
            return self
        C = self.config
        if C.eval_at_start and C.eval_interval and self.iter_num == 0 and self.val_dataset is not None:
            self._report(self._evaluate())  # the model before training
        restore_handlers = self._catch_signals()
        try:
            while not self._finished() and not self.interrupted:
                self._run_epoch()
            if C.ckpt_path and not self.interrupted and self._saved_iter != self.iter_num:
                self.save_checkpoint()
        finally:
            restore_handlers()
        return self

    def _last_step(self, step_in_epoch):
        """Whether the step just taken (step_in_epoch of this epoch) ends the run at max_iters or max_epochs."""
        end_of_epoch = step_in_epoch + 1 == self.steps_per_epoch()
        max_epochs = self.config.max_epochs
        return self._finished() or (end_of_epoch and max_epochs is not None and self.epoch + 1 >= max_epochs)

    def _finished(self):
        C = self.config
        return ((C.max_iters is not None and self.iter_num >= C.max_iters)
                or (C.max_epochs is not None and self.epoch >= C.max_epochs))

    def _run_epoch(self):
        C = self.config
        step_in_epoch = self.epoch_samples // self.global_batch
        bar = self._progress_bar(step_in_epoch)
        loader = iter(self._loader(self.train_dataset, self._epoch_batches(self.epoch, self.epoch_samples)))
        try:
            for _ in range(step_in_epoch, self.steps_per_epoch()):
                count = micro_batches_in_step(len(self.train_dataset), step_in_epoch * self.global_batch,
                                              C.batch_size, C.grad_accum_steps, self.world_size)
                step_batches = [self._check_batch(next(loader)) for _ in range(count)]
                if self._compiled is None:
                    self._step(step_batches)
                else:  # a step whose compile fails is taken again in eager mode
                    self._compiled.run(self._step, step_batches)
                self._after_step(bar, step_in_epoch)
                step_in_epoch += 1
                if self._finished() or self.interrupted:
                    return
        finally:
            if bar is not None:
                bar.close()
        self.epoch += 1
        self.epoch_samples = 0
        self.trigger_callbacks("on_epoch_end")

    def _step(self, batches):
        """One optimizer step over grad_accum_steps micro-batches (still on the CPU)."""
        counts = [int((y >= 0).sum()) for _, y in batches]  # counted before the copy: no GPU sync
        total = self._all_reduce([sum(counts)])[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m, ((x, y), count) in enumerate(zip(batches, counts)):
            x, y = self._to_device(x, y)
            # gradients travel between processes only once, after the last micro-batch
            last = m == len(batches) - 1
            with (nullcontext() if last else self._no_sync()):
                with self._autocast():
                    _, loss = self._forward_model(x, y)
                if loss is None:
                    raise TypeError("the model's forward(x, y) returned no loss")
                if count == 0:
                    loss = torch.nan_to_num(loss)  # a mean over no targets: it adds nothing either way
                # the model returns a mean over its targets: weighting by count over the step's total
                # (times world_size, as DDP averages) makes the step's loss the mean over all its tokens
                self.scaler.scale(loss * (count * self.world_size / max(total, 1))).backward()
            loss_sum = loss_sum + loss.detach().float() * count
        step_loss = loss_sum / max(sum(counts), 1)  # a tensor on the device: reading it waits for the step
        if self._deferred:
            # No sync: a non-finite loss makes the fused optimizer skip this update (and its step count)
            # on the device; the next sync (every log_interval steps) reports it and stops the run.
            self.optimizer.found_inf = (~torch.isfinite(step_loss)).float()
            self._pending.append(step_loss)
            stop = self._stop_requested
        else:
            self._loss = step_loss.item()
            # one exchange tells every process whether any of them saw a bad loss or a stop signal, and
            # gives the step's loss over all processes' targets (each holds its own share)
            if self.world_size > 1:
                bad, stop, everyone = self._all_reduce([not math.isfinite(self._loss), self._stop_requested,
                                                        self._loss * sum(counts)])
                self._loss = everyone / max(total, 1)
            else:
                bad, stop = not math.isfinite(self._loss), self._stop_requested
            if bad:
                self._raise_non_finite(self.iter_num, self._loss)
        self._stop_agreed = bool(stop)

        self.tokens += int(total)
        self.lr = _scheduled_lr(self.config, self.tokens)
        for group in self.optimizer.param_groups:  # a group with its own learning rate follows the same schedule
            group["lr"] = self.lr if "peak_lr" not in group else _scheduled_lr(self.config, self.tokens, group["peak_lr"])
        if isinstance(self.optimizer, MuonAdamW):
            self.optimizer.set_momentum(muon_momentum(self.config, self.iter_num))
        if self.config.grad_norm_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_norm_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _raise_non_finite(self, iteration, loss):
        raise FloatingPointError(
            f"non-finite loss at iteration {iteration} (this process: {loss}); no update was made from it, "
            f"and the last checkpoint ({self.config.ckpt_path}) is intact")

    def _sync(self):
        """Read the losses of the steps run since the last sync (one device sync for all of them)."""
        if not self._pending:
            return
        losses = torch.stack(self._pending).tolist()
        entries = self._history[-len(losses):]
        self._pending = []
        for entry, loss in zip(entries, losses):
            entry["loss"] = loss
            if not math.isfinite(loss):
                self._raise_non_finite(entry["iter"] - 1, loss)
        self._loss = losses[-1]

    @property
    def loss(self):
        """The last step's training loss (this process's share)."""
        self._sync()
        return self._loss

    @property
    def history(self):
        """One dict per step: iter, epoch, tokens, lr, loss (+ val_loss at evaluations)."""
        self._sync()
        return self._history

    def _after_step(self, bar, step_in_epoch):
        """Bookkeeping, reporting, evaluation and checkpoints once a step has changed the weights."""
        C = self.config
        self.iter_num += 1
        self.epoch_samples += self.global_batch
        self._history.append({"iter": self.iter_num, "epoch": self.epoch + 1, "tokens": self.tokens,
                              "lr": self.lr, "loss": None if self._deferred else self._loss})
        log_now = C.log_interval and self.iter_num % C.log_interval == 0
        if not self._deferred or log_now or self._finished():
            line = f"epoch {self.epoch + 1} iter {step_in_epoch}: train loss {self.loss:.5f}. lr {self.lr:e}"
            if bar is not None:
                bar.set_description_str(line, refresh=False)
            if log_now:
                self._print(line, bar, to_console=bar is None)  # the bar shows it already; log.txt keeps it
        if bar is not None:
            bar.update(1)
        self.trigger_callbacks("on_batch_end")
        if self.val_dataset is not None and C.eval_interval and (self.iter_num % C.eval_interval == 0
                                                                 or self._last_step(step_in_epoch)):
            self.history[-1].update(self._evaluate())
            self._report(self.history[-1], bar)
            self.trigger_callbacks("on_eval_end")
        if self._stop_agreed:
            self.interrupted = True
            if C.ckpt_path:
                self.save_checkpoint()
            self._print(f"interrupted at iteration {self.iter_num}; checkpoint: {C.ckpt_path}", bar)
        elif C.ckpt_path and C.ckpt_interval and self.iter_num % C.ckpt_interval == 0:
            self.save_checkpoint()

    def _progress_bar(self, step_in_epoch):
        if not self.is_main or self.config.quiet:
            return None
        total = self.steps_per_epoch()
        if self.config.max_iters is not None:
            total = min(total, step_in_epoch + self.config.max_iters - self.iter_num)
        return tqdm(total=total, initial=step_in_epoch, dynamic_ncols=True, leave=True)

    def _print(self, text, bar=None, to_console=True):
        """A message to the 'mygpt' log (log.txt, with mygpt.setup_logging) and above the progress bar."""
        if not self.is_main:
            return
        if self.log.handlers:
            self.log.info(text, extra={"console": to_console})
        elif to_console:
            (bar.write if bar is not None else print)(text)

    def _autocast(self):
        return precision.autocast(self.device_type, self._autocast_dtype)

    def _all_reduce(self, values):
        """Sum small numbers over all processes (the identity when alone)."""
        if self.world_size == 1:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.device_type == "cuda" else "cpu")
        dist.all_reduce(t)
        return [v.item() for v in t]

    def _catch_signals(self):
        """Turn the first Ctrl-C or SIGTERM (what schedulers send before a kill) into 'checkpoint after this
        step and stop'; a second Ctrl-C aborts."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_requested = True
            self._print(f"{signal.Signals(signum).name}: stopping after this step"
                        f"{' (Ctrl-C again to abort)' if signum == signal.SIGINT else ''}")
        for sig in previous:
            signal.signal(sig, handler)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)
        return restore

    # ---------------------------------------------------------------- evaluation

    def evaluate(self):
        """Mean validation loss per target token over eval_iters batches per process (the same examples each
        time); NaN, with a message, when those batches hold no targets at all."""
        return self._evaluate()["val_loss"]

    def _evaluate(self):
        """An evaluation's figures: val_loss, and val_bpb with eval_bits_per_byte. Its examples: eval_iters batches
        per process, from a fixed random order of the val set (eval_order='random') or from its start ('first')."""
        if self.val_dataset is None:
            raise ValueError("evaluate() needs a val_dataset")
        C = self.config
        B, W, n = C.batch_size, self.world_size, len(self.val_dataset)
        starts = range(self.rank * B, min(n, C.eval_iters * B * W), B * W)
        batches = [list(range(s, min(s + B, n))) for s in starts]  # positions in the order
        if C.eval_order == "random":
            order = EpochOrder(C.seed, 0, n, tag=_VAL_ORDER)
            batches = [order[positions].tolist() for positions in batches]
        checked = (self._check_batch(batch) for batch in self._loader(self.val_dataset, batches))
        mine = score_batches(self.model, checked, self.device, self._autocast_dtype, self._byte_counter)
        total = Score(*self._all_reduce(mine))
        if total.targets == 0:
            self._print("evaluation: the validation batches hold no targets (every y is -1); val loss is NaN")
        if C.eval_bits_per_byte:
            return {"val_loss": total.loss, "val_bpb": total.bits_per_byte}
        return {"val_loss": total.loss}

    def _report(self, figures, bar=None):
        bits = f", {figures['val_bpb']:.5f} bits per byte" if "val_bpb" in figures else ""
        self._print(f"iter {self.iter_num}: val loss {figures['val_loss']:.5f}{bits}", bar)

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self):
        """Everything a checkpoint holds; under torchrun every process must call it (whole tensors reach rank 0)."""
        model_config = getattr(self.model, "config", None)
        if self.sharded:
            weights, optimizer = full_state(self.model, self.optimizer)
        else:
            weights, optimizer = strip_compile_prefix(self.model.state_dict()), self.optimizer.state_dict()
        return {
            "model": weights,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "iter_num": self.iter_num,
            "tokens": self.tokens,
            "epoch": self.epoch,
            "epoch_samples": self.epoch_samples,
            "history": self.history,
            "rng": self._gather_rng(),
            "run_id": self.run_id,
            "train_config": _plain_config(self.config),
            "model_config": _plain_config(model_config) if hasattr(model_config, "to_json") else None,
            "tokenizer": self.tokenizer,
        }

    def _gather_rng(self):
        """Every process's RNG state, indexed by rank: each process has its own dropout stream."""
        state = rng_state(self.device_type)
        if self.world_size == 1:
            return [state]
        states = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self, path=None):
        """Write the whole training state atomically. Under torchrun every process must call it.

        A path other than ckpt_path (a 'best' copy, say) is written only if it holds nothing, a checkpoint
        of this same run, or overwrite=True: a file of another run is never replaced unasked.
        """
        path = path or self.config.ckpt_path
        if not path:
            raise ValueError("no checkpoint path: set config.ckpt_path or pass one")
        # ckpt_path too: a run started beside this one may have written it since this one checked it
        if self.is_main and os.path.exists(path) and not self.config.overwrite and run_id_of(path) != self.run_id:
            raise FileExistsError(f"{path} holds a checkpoint of another run; move it away, write elsewhere, "
                                  f"or set overwrite=True to replace it")
        state = self.state_dict()  # collective: every rank takes part
        if path == self.config.ckpt_path:  # a copy elsewhere does not make the run's checkpoint current
            self._saved_iter = self.iter_num
        if self.is_main:
            save_checkpoint(state, path)

    def _resume(self, path):
        ckpt = load_checkpoint(path)
        missing = [k for k in _TRAINER_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} is not a checkpoint the Trainer wrote (it lacks {missing}); "
                                  f"load its weights with load_checkpoint(path, model) and start a new run")
        self._check_same_model(path, ckpt)
        load_model_state(self.model, ckpt["model"], source=path, load=not self.sharded)
        if self.sharded:
            load_full_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num, self.tokens = ckpt["iter_num"], ckpt["tokens"]
        self.epoch, self.epoch_samples = ckpt["epoch"], ckpt["epoch_samples"]
        self._history = ckpt.get("history", [])
        self.run_id = ckpt["run_id"]
        self._saved_iter = self.iter_num
        self.lr = _scheduled_lr(self.config, self.tokens)
        if self._history:
            self._loss = self._history[-1]["loss"]
        rng = ckpt["rng"]
        if len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        else:
            # another number of processes than when saved: data order still resumes exactly, dropout cannot
            set_seed(self.config.seed + self.rank + self.iter_num)
        self._print(f"resumed from {path} at iteration {self.iter_num} (epoch {self.epoch + 1})")

    def _check_same_model(self, path, ckpt):
        """Refuse to resume into another architecture or tokenizer, even one whose weights have the same shapes
        (2 heads read as 4, token shift switched on): the run would go on training something else."""
        config, saved = getattr(self.model, "config", None), ckpt.get("model_config")
        if saved and hasattr(config, "to_json"):
            current = _plain_config(config)
            # a field the checkpoint predates has its default value there; older spellings read as the model
            # class reads them (GPT.upgrade_config)
            cls = type(self.model)
            defaults = _plain_config(cls.get_default_config()) if hasattr(cls, "get_default_config") else {}
            saved = {**defaults, **(cls.upgrade_config(saved) if hasattr(cls, "upgrade_config") else saved)}
            for key in sorted(set(saved) | set(current)):
                if key not in _RESUMABLE_MODEL_FIELDS and saved.get(key) != current.get(key):
                    raise CheckpointError(
                        f"{path} was trained with model.{key}={saved.get(key)!r}, but this run's model has "
                        f"{key}={current.get(key)!r}; resume with the checkpoint's model config (drop the "
                        f"override), or start a new run with another ckpt_path or work dir")
        for dataset in (self.train_dataset, self.val_dataset):  # a corpus that records its tokenizer (meta.json)
            if hasattr(dataset, "check_tokenizer") and ckpt.get("tokenizer") is not None:
                dataset.check_tokenizer(ckpt["tokenizer"])
        if self.tokenizer is not None and ckpt.get("tokenizer") is not None and ckpt["tokenizer"] != self.tokenizer:
            raise CheckpointError(f"{path} was trained with another tokenizer than this run's data "
                                  f"({_short(ckpt['tokenizer'])} vs {_short(self.tokenizer)}); resume on data "
                                  f"tokenized as the checkpoint's, or start a new run elsewhere")

    # ---------------------------------------------------------------- history

    def save_history(self, path):
        """The per-step history as JSON (path ending .json) or CSV (anything else), written atomically."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            if os.fspath(path).endswith(".json"):
                json.dump(self.history, f, indent=1)
            else:  # the usual columns, then any a callback added (a benchmark's accuracy, say) as they first appear
                columns = ["iter", "epoch", "tokens", "lr", "loss", "val_loss"]
                columns += [k for k in dict.fromkeys(k for h in self.history for k in h) if k not in columns]
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.history)


def _leave_process_group():
    """At exit: free what still holds the process group (DDP's reducer sits in reference cycles), then destroy it,
    so that no gloo thread is left running when the interpreter tears down (it aborts the process then)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _restart_safe_store(rank, world_size):
    """init_process_group arguments that survive torchrun restarting the job (--max-restarts).

    A restarted attempt talks to the same torchrun agent store as the failed one, where the failed
    processes' addresses are still written; a new process can read one of those before its peer
    replaces it and then waits on a dead address. Keys under a prefix per attempt cannot be stale.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return {"store": dist.PrefixStore(f"mygpt/attempt_{attempt}", store), "rank": rank, "world_size": world_size}
