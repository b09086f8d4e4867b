"""Small helpers shared by the library and the projects: seeding, a config node and a run's work dir."""

import ast
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def set_seed(seed):
    """Seed python, numpy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _parse_value(text):
    """Read a command-line value as a Python literal, falling back to the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class CfgNode:
    """A tiny attribute bag for configuration, nestable, with command-line overrides.

    Every component owns one (``GPT.get_default_config()``, ``Trainer.get_default_config()``);
    a script groups them under one root (``C.model``, ``C.trainer``) and lets
    ``--model.n_layer=4`` style arguments override any leaf.
    """

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __str__(self):
        return self._str_helper(0)

    def __repr__(self):
        return f"CfgNode({self.to_dict()!r})"

    def __eq__(self, other):
        return isinstance(other, CfgNode) and self.to_dict() == other.to_dict()

    def _str_helper(self, indent):
        lines = []
        for key, value in self.__dict__.items():
            if isinstance(value, CfgNode):
                lines.append(f"{key}:\n{value._str_helper(indent + 1)}")
            else:
                lines.append(f"{key}: {value!r}")
        return "\n".join("    " * indent + line for line in lines)

    def to_dict(self):
        """A plain nested dict, e.g. to store in a checkpoint or a JSON file."""
        return {k: v.to_dict() if isinstance(v, CfgNode) else v for k, v in self.__dict__.items()}

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, default=str)

    def merge_from_dict(self, d):
        """Update from a (possibly nested) dict; nested dicts update nested nodes.

        Unknown keys raise ``KeyError`` naming the key, so a typo never silently does nothing.
        """
        for key, value in d.items():
            if key not in self.__dict__:
                raise KeyError(f"unknown config key {key!r}; known keys: {sorted(self.__dict__)}")
            current = self.__dict__[key]
            if isinstance(current, CfgNode) and isinstance(value, dict):
                current.merge_from_dict(value)
            else:
                self.__dict__[key] = value

    def merge_from_args(self, args):
        """Apply overrides of the form ``--model.n_layer=4`` (values parsed as Python literals)."""
        for arg in args:
            if not arg.startswith("--") or "=" not in arg:
                raise ValueError(f"expected an override like --trainer.batch_size=32, got {arg!r}")
            dotted, text = arg[2:].split("=", 1)
            *path, leaf = dotted.split(".")
            node = self
            for i, key in enumerate(path):
                if not isinstance(node.__dict__.get(key), CfgNode):
                    raise KeyError(f"unknown config key {'.'.join(path[:i + 1])!r} in {arg!r}")
                node = node.__dict__[key]
            if leaf not in node.__dict__:
                raise KeyError(f"unknown config key {dotted!r} in {arg!r}")
            if isinstance(node.__dict__[leaf], CfgNode):
                raise KeyError(f"{dotted!r} is a config group, not a value; set one of its keys")
            node.__dict__[leaf] = _parse_value(text)


class ConsoleHandler(logging.Handler):
    """Prints log messages above a running tqdm progress bar (never glued to it), on stdout.

    A record logged with extra={"console": False} goes to the other handlers (log.txt) only.
    """

    def emit(self, record):
        if getattr(record, "console", True):
            tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(config):
    """Prepare config.system.work_dir for a run: save the config as JSON, log to the console and to log.txt.

    Returns the "mygpt" logger; calling this again (a second run in one process) replaces its handlers.
    """
    work_dir = Path(config.system.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")
    logger = logging.getLogger("mygpt")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the handlers below already print; the root logger must not print twice
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(ConsoleHandler())
    to_file = logging.FileHandler(work_dir / "log.txt", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(to_file)
    return logger
