"""
Checkpoints: written atomically, checked on the way in, never executing code on load.

A checkpoint is a dict saved with torch.save. Writing goes to a temporary file of a name unique to
the process, is flushed to disk, then renamed over the target (mygpt.utils.atomic_path), so a kill at
any moment leaves the previous file whole. A sha256 over every tensor's bytes and every value (the configs, the
counters) is stored beside them and verified on load, so a file damaged on disk is reported as damaged instead of
training on corrupted weights or reading them as another model.
Loading uses torch.load(weights_only=True): only tensors and plain Python values are unpickled.
"""

import hashlib
import os
import pickle
import random
import uuid

import numpy as np
import torch

from mygpt.utils import atomic_path, check_output_file, remove_stale_temporaries


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, is damaged, or does not fit the model it is loaded into."""


_ALL_VALUES = "all:"  # how a checksum over every value starts; older files checksummed only their tensors


def _checksum(state, values=True):
    """sha256 over every entry of a nested dict/list: names, and each tensor's dtype, shape and bytes, and with
    values=True each plain value (the config, the history, the counters: what gives the tensors their meaning)
    by type and repr, which is exact for the ints, floats, strings, bools and None a checkpoint holds."""
    digest = hashlib.sha256()

    def visit(prefix, value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{prefix}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            for k, v in value.items():
                if prefix or k != "checksum":
                    visit(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{prefix}/{i}", v)
        elif values:
            digest.update(f"{prefix}={type(value).__name__}:{value!r};".encode())

    visit("", state)
    return (_ALL_VALUES if values else "") + digest.hexdigest()


def check_writable(path):
    """Raise a clear error now, before any training, if a checkpoint can never be written to path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint path {path} is a directory; give a file name such as {os.path.join(path, 'ckpt.pt')}")
    check_output_file(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".mygpt-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
        remove_stale_temporaries(directory, os.path.basename(path))  # left by a run killed while saving
    except OSError as err:
        raise ValueError(f"cannot write checkpoints to {path}: {err.strerror or err} ({directory}); "
                         f"choose another ckpt_path") from err


def save_checkpoint(state, path):
    """Write the dict state to path atomically, with a checksum of everything in it."""
    state = dict(state, checksum=_checksum(state))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # two runs never share a temporary file
        torch.save(state, f)


def read_checkpoint(path, map_location="cpu"):
    """The dict saved at path, its checksum verified; clear errors for a missing, damaged or foreign file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a well-formed pickle naming a class or function
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain values; mygpt does not "
                                  f"load those, since unpickling them could run code") from err
        raise CheckpointError(f"{path} is damaged or not a torch checkpoint (truncated, overwritten or another "
                              f"format)") from err
    except Exception as err:
        raise CheckpointError(f"{path} is damaged or not a torch checkpoint (truncated, overwritten or another "
                              f"format): {type(err).__name__}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a mygpt checkpoint: it holds no model weights")
    if "checksum" in ckpt and ckpt["checksum"] != _checksum(ckpt, values=str(ckpt["checksum"]).startswith(_ALL_VALUES)):
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with them "
                              f"(bit rot or a partial copy); use an earlier checkpoint or a backup")
    return ckpt


def _peek(path, key):
    """The value of a checkpoint file's top-level key, read without loading its tensors (None if it has none or
    is unreadable): memory-mapped, at no cost in the size of the checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt.get(key) if isinstance(ckpt, dict) else None


def run_id_of(path):
    """The run_id a checkpoint file records: enough to tell whether a file belongs to a run."""
    return _peek(path, "run_id")


def train_config_of(path):
    """The trainer config a checkpoint file records (a plain dict), or None."""
    return _peek(path, "train_config")


def strip_compile_prefix(state_dict):
    """torch.compile wraps the model and prefixes every key with '_orig_mod.'; the weights are the same."""
    prefix = "_orig_mod."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_checkpoint(path, model=None, map_location="cpu"):
    """Read a checkpoint written by the Trainer; with ``model``, also load its weights into it.

    A missing, damaged or foreign file raises an error saying so, and a model of another shape one
    naming the keys that differ.
    """
    ckpt = read_checkpoint(path, map_location)
    ckpt["model"] = strip_compile_prefix(ckpt["model"])
    if model is not None:
        load_model_state(model, ckpt["model"], source=path)
    return ckpt


_RUN_FILES = ("best.pt", "checkpoint.pt")  # what a run folder's model is: its best, else its last


def checkpoint_file(source):
    """source itself, or for a run's work dir the checkpoint of its model: best.pt, else checkpoint.pt."""
    if not os.path.isdir(source):
        return source
    for name in _RUN_FILES:
        if os.path.isfile(os.path.join(source, name)):
            return os.path.join(source, name)
    raise FileNotFoundError(f"{source} holds no {' or '.join(_RUN_FILES)}: train first, or give a checkpoint file")


def open_checkpoint(source, device="cpu", int8_layers="auto", **overrides):
    """The one door from a checkpoint to what it holds: (model in eval mode on device, its text tokenizer or None,
    the checkpoint dict), read once, from a Trainer's checkpoint, a quantized one (mygpt.quantize) or a run's work
    dir (its best.pt, else checkpoint.pt). int8_layers: for a quantized one, where the int8 kernel runs
    (load_quantized's layers: "auto" or "all"). overrides set model config fields that leave the weights' shapes
    alone (the dropout to fine-tune with, attention), as GPT.from_checkpoint takes them.

        model, tokenizer, ckpt = mygpt.open_checkpoint("out/chargpt")
        print(tokenizer.decode(model.generate(torch.tensor([tokenizer.encode("ROMEO:")]), 50)[0].tolist()))
    """
    from mygpt.model import GPT
    from mygpt.quantize import FORMAT, check_layers, load_quantized
    from mygpt.tokenizer import TYPES, load_tokenizer
    check_layers(int8_layers)  # before reading: a wrong value is wrong for any checkpoint
    path = checkpoint_file(source)
    ckpt = load_checkpoint(path)
    if not ckpt.get("model_config"):
        raise CheckpointError(f"{path} records no model config: it holds a model that is not a mygpt GPT; build it "
                              f"yourself and load_checkpoint(path, model=...)")
    if ckpt.get("format") == FORMAT:
        model = load_quantized(dict(ckpt, model_config={**ckpt["model_config"], **overrides}), layers=int8_layers)
    else:
        model = GPT.from_checkpoint(ckpt, **overrides)
    description = ckpt.get("tokenizer")
    text = isinstance(description, dict) and description.get("type") in TYPES
    return model.to(device), load_tokenizer(description) if text else None, ckpt


def load_model_state(model, state_dict, source="checkpoint", load=True):
    """``model.load_state_dict`` with an error that lists the missing, unexpected and reshaped keys (with
    load=False, only the check: a sharded model loads through mygpt.parallel)."""
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
    if load:
        model.load_state_dict(state_dict)


# ---------------------------------------------------------------- random number generators

def rng_state(device_type):
    """The state of every RNG a training step draws from, as values weights_only loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        # weights_only unpickling refuses numpy arrays, so the key array travels as a list of ints
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device_type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _as_tuples(value):
    """random.setstate wants the nested tuples that a round trip through some formats turns into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
