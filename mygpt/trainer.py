"""The training loop: any model whose ``forward(x, y)`` returns ``(logits, loss)``, from a laptop CPU to
many GPUs on several machines under ``torchrun``.

What it guarantees, and how:

- The data order is a pure function of ``(seed, epoch)`` and the position inside the epoch is counted in
  examples, so a checkpoint names exactly which example comes next.
- A checkpoint holds everything that decides the future of the run (weights, optimizer, grad scaler,
  schedule position, sampler position, every RNG state); it is written to a temporary file and renamed
  over the old one, so a kill at any moment leaves the previous checkpoint whole. On CPU a resumed run
  ends bit-identical to one that was never interrupted.
- Gradients are weighted by token counts, so k accumulated micro-batches, or n processes, compute the
  same update as one large batch.
"""

import csv
import json
import math
import os
import random
import signal
import threading
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mygpt.utils import CfgNode, set_seed

EVENTS = ("on_batch_end", "on_epoch_end", "on_eval_end")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_ORDER, TEST_ORDER = 0, 1  # tags that keep the train and test shuffles independent
CHECKPOINT_KEYS = ("model", "optimizer", "iter_num", "tokens", "epoch", "epoch_samples", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or does not fit the model it is loaded into."""


def scheduled_lr(config, tokens):
    """The learning rate after ``tokens`` target tokens: linear warmup, then cosine down to 10%, then flat."""
    if not config.lr_decay:
        return config.learning_rate
    if tokens < config.warmup_tokens:
        mult = tokens / max(1, config.warmup_tokens)
    else:
        progress = (tokens - config.warmup_tokens) / max(1, config.final_tokens - config.warmup_tokens)
        progress = min(progress, 1.0)  # past final_tokens the cosine would climb again: hold it at the floor
        mult = max(0.1, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return config.learning_rate * mult


def fill_schedule(config, targets_per_example):
    """Complete a schedule left open: final_tokens=None ends the cosine at max_iters, warmup_tokens=None warms up
    over its first 5%. ``targets_per_example`` is the number of targets (y >= 0) in one example."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = config.batch_size * config.grad_accum_steps * world_size * targets_per_example
    if config.final_tokens is None:
        config.final_tokens = config.max_iters * tokens_per_step
    if config.warmup_tokens is None:
        config.warmup_tokens = config.final_tokens // 20


def resolve_device(name):
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _strip_compile_prefix(state_dict):
    """torch.compile wraps the model and prefixes every key with '_orig_mod.'; the weights are the same."""
    prefix = "_orig_mod."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_checkpoint(path, model=None):
    """Read a checkpoint written by the Trainer; with ``model``, also load its weights into it.

    Only tensors and plain Python values are unpickled (``weights_only=True``). A missing, truncated or
    foreign file raises an error saying so, and a model of another shape one naming the keys that differ.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable (corrupt or truncated?): {err}") from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a mygpt trainer checkpoint: it lacks {missing}")
    ckpt["model"] = _strip_compile_prefix(ckpt["model"])
    if model is not None:
        load_model_state(model, ckpt["model"], source=path)
    return ckpt


def load_model_state(model, state_dict, source="checkpoint"):
    """``model.load_state_dict`` with an error that lists the missing, unexpected and reshaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or reshaped:
        def show(names):
            return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") or "none"
        raise CheckpointError(
            f"{source} is from a different model: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape (checkpoint vs model): {show(reshaped)}")
    model.load_state_dict(state_dict)


def _rng_state(device_type):
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device_type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _numpy_state_to_plain(state):
    # weights_only unpickling refuses numpy arrays, so the key array travels as a list of ints
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), pos, has_gauss, cached]


def _numpy_state_from_plain(state):
    name, keys, pos, has_gauss, cached = state
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached


def _as_tuples(value):
    """random.setstate wants the nested tuples that a round trip through some formats turns into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _plain_config(config):
    """A config as JSON-safe values, so that weights_only loading accepts it whatever the user put in."""
    return json.loads(config.to_json())


class Trainer:
    """Trains ``model`` on ``train_dataset``; ``run()`` it, read its state, hook callbacks into it."""

    @staticmethod
    def get_default_config():
        C = CfgNode()
        C.device = "auto"            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
        C.num_workers = 0            # DataLoader worker processes; 0 is always safe (and needed on Windows)
        C.max_iters = None           # stop after this many optimizer steps ...
        C.max_epochs = None          # ... or epochs; with neither, train until Ctrl-C
        C.batch_size = 64            # examples per micro-batch per process
        C.learning_rate = 3e-4
        C.betas = (0.9, 0.95)
        C.weight_decay = 0.1         # read by the model's configure_optimizers, or the plain AdamW
        C.grad_norm_clip = 1.0       # None or 0 turns clipping off
        C.lr_decay = False           # warmup then cosine decay, counted in target tokens
        C.warmup_tokens = 375e6
        C.final_tokens = 260e9
        C.grad_accum_steps = 1       # micro-batches per optimizer step
        C.precision = "fp32"         # 'fp32', 'bf16' or 'fp16' (autocast; fp16 adds a grad scaler)
        C.compile = False            # torch.compile the model
        C.ckpt_path = None           # where checkpoints go; None writes none
        C.ckpt_interval = 0          # also every this many steps (0: only at the end and on Ctrl-C)
        C.resume = False             # continue from ckpt_path when it exists
        C.eval_interval = 500        # test loss every this many steps, when there is a test set (0: never)
        C.eval_iters = 20            # batches per process in one evaluation
        C.seed = 1337                # decides the RNGs at the start and the data order of every epoch
        C.quiet = False              # no progress bar: a plain line every log_interval steps, for log files
        C.log_interval = 100
        return C

    def __init__(self, config, model, train_dataset, test_dataset=None):
        self.config = config
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.callbacks = {event: [] for event in EVENTS}
        self._check_config()
        self._check_dataset(train_dataset, "train_dataset")
        if test_dataset is not None:
            self._check_dataset(test_dataset, "test_dataset")

        self._setup_distributed()
        self.model = model.to(self.device)
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=config.precision == "fp16")
        self._autocast_dtype = PRECISIONS[config.precision]
        self._forward_model = torch.compile(self.model) if config.compile else self.model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device_type == "cuda" else None
            self._forward_model = DistributedDataParallel(self._forward_model, device_ids=device_ids)

        self.iter_num = 0            # optimizer steps done
        self.tokens = 0              # target tokens (y >= 0) seen, over all processes
        self.epoch = 0               # epochs completed
        self.epoch_samples = 0       # examples of the current epoch's order already used
        self.lr = scheduled_lr(config, 0)
        self.loss = None             # the last step's training loss (this process's share)
        self.history = []            # one dict per step: iter, epoch, tokens, lr, loss (+ test_loss)
        self.interrupted = False
        self._stop_requested = False  # set by Ctrl-C in this process
        self._stop_agreed = False     # set when any process had Ctrl-C, at the same step everywhere
        self._saved_iter = None      # the step of the last checkpoint, to avoid writing it twice

        if config.resume and config.ckpt_path and os.path.exists(config.ckpt_path):
            self._resume(config.ckpt_path)
        else:
            set_seed(config.seed + self.rank)  # each process its own dropout; the data order is shared

    # ---------------------------------------------------------------- setup

    def _check_config(self):
        C = self.config
        if C.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {C.precision!r}")
        if C.batch_size < 1 or C.grad_accum_steps < 1:
            raise ValueError("batch_size and grad_accum_steps must be at least 1")
        if not isinstance(C.seed, int) or C.seed < 0:
            raise ValueError(f"seed must be an int >= 0 (it fixes the data order), got {C.seed!r}")

    @staticmethod
    def _check_dataset(dataset, name):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"{name} must be a map-style dataset with __len__ and __getitem__")
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty")

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
                dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.is_main = self.rank == 0

    def _make_optimizer(self):
        if hasattr(self.model, "configure_optimizers"):
            return self.model.configure_optimizers(self.config)
        C = self.config
        return torch.optim.AdamW(self.model.parameters(), lr=C.learning_rate, betas=C.betas,
                                 weight_decay=C.weight_decay)

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
            raise ValueError(f"unknown event {event!r}; events are {list(EVENTS)}")
        return self.callbacks[event]

    # ---------------------------------------------------------------- data

    @property
    def global_batch(self):
        """Examples per optimizer step, over all micro-batches and processes."""
        return self.config.batch_size * self.config.grad_accum_steps * self.world_size

    def steps_per_epoch(self):
        return math.ceil(len(self.train_dataset) / self.global_batch)

    def _epoch_batches(self, epoch, start):
        """This process's micro-batches (lists of indices) for the rest of ``epoch``, from example ``start``.

        Step s of the epoch takes the next global_batch examples of the epoch's order; micro-batch m of
        process r is slice m * world_size + r of that chunk. So one process with a k-times larger batch
        sees exactly the examples that k micro-batches, or k processes, see together. The last step is
        filled up by wrapping to the start of the order, so every process always has full batches.
        """
        n = len(self.train_dataset)
        order = np.random.default_rng([self.config.seed, TRAIN_ORDER, epoch]).permutation(n)
        rest = order[start:]
        pad = -len(rest) % self.global_batch
        rest = np.concatenate([rest, np.resize(order, pad)]).tolist()
        B, W = self.config.batch_size, self.world_size
        batches = []
        for step_start in range(0, len(rest), self.global_batch):
            for m in range(self.config.grad_accum_steps):
                first = step_start + (m * W + self.rank) * B
                batches.append(rest[first:first + B])
        return batches

    def _loader(self, dataset, batches):
        # a private generator: creating a DataLoader iterator would otherwise draw from the global RNG,
        # and a resumed run creates its iterator at a point where the uninterrupted one did not
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.config.num_workers,
                          pin_memory=self.device_type == "cuda", generator=torch.Generator())

    @staticmethod
    def _check_batch(batch):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and torch.is_tensor(batch[0]) and torch.is_tensor(batch[1])):
            shape = [type(b).__name__ for b in batch] if isinstance(batch, (tuple, list)) else type(batch).__name__
            raise TypeError(f"the dataset must yield (x, y) pairs of tensors; a batch came out as {shape}")
        return batch

    def _to_device(self, x, y):
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # ---------------------------------------------------------------- the loop

    def run(self):
        """Train until max_iters or max_epochs (or Ctrl-C, which saves a checkpoint and returns)."""
        self.interrupted = self._stop_requested = self._stop_agreed = False
        restore_handler = self._catch_ctrl_c()
        try:
            while not self._finished() and not self.interrupted:
                self._run_epoch()
            if self.config.ckpt_path and not self.interrupted and self._saved_iter != self.iter_num:
                self.save_checkpoint()
        finally:
            restore_handler()
        return self

    def _finished(self):
        C = self.config
        return ((C.max_iters is not None and self.iter_num >= C.max_iters)
                or (C.max_epochs is not None and self.epoch >= C.max_epochs))

    def _run_epoch(self):
        batches = self._epoch_batches(self.epoch, self.epoch_samples)
        step_in_epoch = self.epoch_samples // self.global_batch
        bar = self._progress_bar(step_in_epoch)
        loader = iter(self._loader(self.train_dataset, batches))
        try:
            for _ in range(len(batches) // self.config.grad_accum_steps):
                step_batches = [self._check_batch(next(loader)) for _ in range(self.config.grad_accum_steps)]
                self._step(step_batches)
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
            no_sync = self._forward_model.no_sync if self.world_size > 1 and not last else nullcontext
            with no_sync():
                with self._autocast():
                    _, loss = self._forward_model(x, y)
                if loss is None:
                    raise TypeError("the model's forward(x, y) returned no loss")
                # the model returns a mean over its targets: weighting by count over the step's total
                # (times world_size, as DDP averages) makes the step's loss the mean over all its tokens
                self.scaler.scale(loss * (count * self.world_size / max(total, 1))).backward()
            loss_sum = loss_sum + loss.detach().float() * count
        self.loss = (loss_sum / max(sum(counts), 1)).item()
        # one exchange tells every process whether any of them saw a bad loss or a Ctrl-C
        bad, stop = self._all_reduce([not math.isfinite(self.loss), self._stop_requested])
        self._stop_agreed = bool(stop)
        if bad:
            raise FloatingPointError(
                f"non-finite loss at iteration {self.iter_num} (epoch {self.epoch + 1}; this process: {self.loss}); "
                f"stopped before the update, the last checkpoint ({self.config.ckpt_path}) is intact")

        self.tokens += int(total)
        self.lr = scheduled_lr(self.config, self.tokens)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if self.config.grad_norm_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_norm_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _after_step(self, bar, step_in_epoch):
        """Bookkeeping, reporting, evaluation and checkpoints once a step has changed the weights."""
        C = self.config
        self.iter_num += 1
        self.epoch_samples += self.global_batch
        self.history.append({"iter": self.iter_num, "epoch": self.epoch + 1, "tokens": self.tokens,
                             "lr": self.lr, "loss": self.loss})
        line = f"epoch {self.epoch + 1} iter {step_in_epoch}: train loss {self.loss:.5f}. lr {self.lr:e}"
        if bar is not None:
            bar.set_description_str(line, refresh=False)
            bar.update(1)
        elif self.is_main and C.log_interval and self.iter_num % C.log_interval == 0:
            print(line, flush=True)
        self.trigger_callbacks("on_batch_end")
        if self.test_dataset is not None and C.eval_interval and self.iter_num % C.eval_interval == 0:
            self.history[-1]["test_loss"] = self.evaluate()
            self._print(f"iter {self.iter_num}: test loss {self.history[-1]['test_loss']:.5f}", bar)
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

    def _print(self, text, bar=None):
        if self.is_main:
            (bar.write if bar is not None else print)(text)

    def _autocast(self):
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self._autocast_dtype)

    def _all_reduce(self, values):
        """Sum small numbers over all processes (the identity when alone)."""
        if self.world_size == 1:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.device_type == "cuda" else "cpu")
        dist.all_reduce(t)
        return [v.item() for v in t]

    def _catch_ctrl_c(self):
        """Turn the first Ctrl-C into 'checkpoint after this step and stop'; a second one aborts."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self._print("Ctrl-C: stopping after this step (again to abort)")
        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self):
        """Mean test loss per target token over eval_iters batches per process (a fixed subset each time)."""
        if self.test_dataset is None:
            raise ValueError("evaluate() needs a test_dataset")
        B, W = self.config.batch_size, self.world_size
        rng = np.random.default_rng([self.config.seed, TEST_ORDER, 0])
        order = rng.permutation(len(self.test_dataset)).tolist()
        batches = [order[i:i + B] for i in range(self.rank * B, len(order), B * W)][:self.config.eval_iters]
        was_training = self.model.training
        self.model.eval()
        loss_sum, count = 0.0, 0
        for batch in self._loader(self.test_dataset, batches):
            x, y = self._to_device(*self._check_batch(batch))
            with self._autocast():
                _, loss = self.model(x, y)
            n = int((y >= 0).sum())
            loss_sum += loss.float().item() * n
            count += n
        self.model.train(was_training)
        loss_sum, count = self._all_reduce([loss_sum, count])
        return loss_sum / max(count, 1)

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self):
        C = self.config
        model_config = getattr(self.model, "config", None)
        return {
            "model": _strip_compile_prefix(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter_num": self.iter_num,
            "tokens": self.tokens,
            "epoch": self.epoch,
            "epoch_samples": self.epoch_samples,
            "history": self.history,
            "rng": self._gather_rng(),
            "world_size": self.world_size,
            "train_config": _plain_config(C),
            "model_config": _plain_config(model_config) if hasattr(model_config, "to_json") else None,
        }

    def _gather_rng(self):
        """Every process's RNG state, indexed by rank: each process has its own dropout stream."""
        state = _rng_state(self.device_type)
        if self.world_size == 1:
            return [state]
        states = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self, path=None):
        """Write the whole training state atomically. Under torchrun every process must call it."""
        path = path or self.config.ckpt_path
        if not path:
            raise ValueError("no checkpoint path: set config.ckpt_path or pass one")
        state = self.state_dict()  # collective: every rank takes part
        if path == self.config.ckpt_path:  # a copy elsewhere does not make the run's checkpoint current
            self._saved_iter = self.iter_num
        if not self.is_main:
            return
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        except BaseException:
            os.remove(tmp)  # the previous checkpoint is untouched; leave no half-written file beside it
            raise
        os.replace(tmp, path)

    def _resume(self, path):
        ckpt = load_checkpoint(path, model=self.model)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num, self.tokens = ckpt["iter_num"], ckpt["tokens"]
        self.epoch, self.epoch_samples = ckpt["epoch"], ckpt["epoch_samples"]
        self.history = ckpt.get("history", [])
        self._saved_iter = self.iter_num
        self.lr = scheduled_lr(self.config, self.tokens)
        if self.history:
            self.loss = self.history[-1]["loss"]
        rng = ckpt["rng"]
        if len(rng) == self.world_size:
            _set_rng_state(rng[self.rank])
        else:
            # another number of processes than when saved: data order still resumes exactly, dropout cannot
            set_seed(self.config.seed + self.rank + self.iter_num)
        self._print(f"resumed from {path} at iteration {self.iter_num} (epoch {self.epoch + 1})")

    # ---------------------------------------------------------------- history

    def save_history(self, path):
        """The per-step history as JSON (path ending .json) or CSV (anything else)."""
        if path.endswith(".json"):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.history, f, indent=1)
            return
        columns = ["iter", "epoch", "tokens", "lr", "loss", "test_loss"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)

