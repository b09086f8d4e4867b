"""Small helpers shared by the library and the projects: seeding, a config node and a run's work dir."""

import ast
import difflib
import json
import logging
import numbers
import os
import random
import re
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mygpt.recipes import merge_args


def set_seed(seed, option="seed"):
    """Seed python, numpy and torch (all devices) so a run can be repeated; option names the seed in an error."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        # numpy's legacy generator takes no other seed; refused here, before anything is seeded
        raise ValueError(f"{option} must be an int from 0 to 2**32 - 1 (numpy's range), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")
_NONE_WORDS = ("None", "none", "null")


def _type_name(default):
    """How --help and the errors name the type a key's value must have."""
    if default is None:
        return "literal or text"  # no default to take a type from: 4 is an int, book.txt text
    if isinstance(default, list):  # any length, items like the first
        return f"list of {_type_name(default[0])}" if default else "list"
    if isinstance(default, tuple):  # this length, each item like the default's at its place
        return f"tuple ({', '.join(_type_name(x) for x in default)})"
    return type(default).__name__


class UsageError(ValueError):
    """A command line that cannot be accepted (a wrong option, key or value): run_main exits with status 2 for
    it, as argparse does, and 1 for what fails after the command line was read."""


class UnknownKeyError(UsageError, KeyError):
    """A config key that does not exist (a KeyError, as a missing key is)."""
    __str__ = Exception.__str__  # the message as written, not quoted as KeyError quotes a key


def _wants(key, default, got):
    """The ValueError for a value of the wrong type: 'trainer.batch_size wants an int, got 'abc''."""
    name = _type_name(default)
    article = "an" if name[0] in "aeiou" else "a"
    return UsageError(f"{key} wants {article} {name}, got {got!r}")


def _coerce(value, default, key):
    """The Python value converted to the type of default (int -> float, list <-> tuple), or a ValueError."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
    elif isinstance(default, numbers.Integral):  # numpy integers too
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3 is a fine way to write 1000
            return int(value)
    elif isinstance(default, numbers.Real):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)) and (isinstance(default, list) or len(value) == len(default)):
            # a list's items take the type of its first item; a tuple's, that of the item at their place
            models = default if isinstance(default, tuple) else [default[0] if default else None] * len(value)
            return type(default)(_coerce(v, d, f"{key}[{i}]") for i, (v, d) in enumerate(zip(value, models)))
    elif isinstance(value, type(default)):
        return value
    raise _wants(key, default, value)


def _unquote(text):
    """Text without the quotes around it when the whole value is quoted ('"ROMEO:"' -> 'ROMEO:')."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            value = ast.literal_eval(text)  # so '"\\n"' is a newline, as Python reads it
        except (ValueError, SyntaxError):
            return text[1:-1]
        return value if isinstance(value, str) else text[1:-1]
    return text


def _parse_value(text, default, key):
    """A command-line value converted to the type of the key's default, or a ValueError naming the key.

    Text keys take the text as it is (quotes around the whole value removed); None and other defaults read
    a Python literal, falling back to the text. Any key takes None (only 'None' itself for a text key).
    """
    if isinstance(default, str):
        return None if text == "None" else _unquote(text)
    if text.strip() in _NONE_WORDS:
        return None
    if isinstance(default, bool):
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise UsageError(f"{key} wants a bool (true/false, 1/0, yes/no), got {text!r}")
    if isinstance(default, float):
        try:
            return float(text)  # also 'inf', which is no Python literal
        except ValueError:
            raise _wants(key, default, text) from None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise _wants(key, default, text) from None
    return _coerce(value, default, key)


def _leaves(node, prefix=""):
    """(dotted key, value) of every value under node, in the order the config defines them."""
    for key, value in node.__dict__.items():
        if isinstance(value, CfgNode):
            yield from _leaves(value, prefix + key + ".")
        else:
            yield prefix + key, value


def _unknown_key(root, dotted, hint):
    """A KeyError for a key root does not hold, naming the known keys closest to it."""
    known = [path for path, _ in _leaves(root)]
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [path for path in known if path.rsplit(".", 1)[-1] == leaf]  # the right key in the wrong group
    close = same_leaf + [p for p in difflib.get_close_matches(dotted, known, n=3, cutoff=0.8) if p not in same_leaf]
    if close:
        return UnknownKeyError(f"unknown config key {dotted!r}; did you mean {' or '.join(map(repr, close))}? {hint}")
    return UnknownKeyError(f"unknown config key {dotted!r} {hint}")


class CfgNode:
    """A tiny attribute bag for configuration, nestable, with command-line overrides.

    Every component owns one (``GPT.get_default_config()``, ``Trainer.get_default_config()``);
    a script groups them under one root (``C.model``, ``C.trainer``) and lets
    ``--model.n_layer=4`` style arguments override any leaf, each value converted to the type of
    the leaf's default; ``--help`` lists every key.
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
        """Update from a (possibly nested) dict of Python values, taken as they are; nested dicts update groups.

        Unknown keys raise ``KeyError`` naming the closest known keys, so a typo never silently does nothing.
        """
        self._merge_dict(d, self, "")

    def _merge_dict(self, d, root, prefix):
        for key, value in d.items():
            if key not in self.__dict__:
                known = ", ".join(sorted(self.__dict__))
                raise _unknown_key(root, prefix + key, f"(the keys here: {known})")
            current = self.__dict__[key]
            if isinstance(current, CfgNode):
                if not isinstance(value, (dict, CfgNode)):
                    raise TypeError(f"{prefix + key!r} is a config group; give a dict of its keys, got {value!r}")
                current._merge_dict(value if isinstance(value, dict) else value.to_dict(), root, prefix + key + ".")
            else:
                self.__dict__[key] = value

    def merge_from_args(self, args, description=None):
        """Apply overrides like ``--model.n_layer=4``, each value converted to the type of the key's default.

        ``--help`` or ``-h`` prints format_help(description) and exits, as argparse does. A bad value raises a
        ValueError naming the key and the type it wants; an unknown key a KeyError naming the closest ones.
        """
        if isinstance(args, str):
            raise TypeError(f"args must be a list of strings such as sys.argv[1:], got the string {args!r}")
        if "--help" in args or "-h" in args:
            print(self.format_help(description))
            sys.exit(0)
        for arg in args:
            if not arg.startswith("--") or "=" not in arg:
                raise UsageError(f"expected an override like --trainer.batch_size=32, got {arg!r} "
                                 f"(--help lists every key)")
            dotted, text = arg[2:].split("=", 1)
            node, leaf = self._find(dotted)
            node.__dict__[leaf] = _parse_value(text, node.__dict__[leaf], dotted)

    def _find(self, dotted):
        """The node holding the value at a dotted key, and the key's last part."""
        *path, leaf = dotted.split(".")
        node = self
        for i, key in enumerate(path):
            if key not in node.__dict__:
                raise _unknown_key(self, dotted, "(--help lists every key)")
            node = node.__dict__[key]
            if not isinstance(node, CfgNode):
                raise UnknownKeyError(f"{'.'.join(path[:i + 1])!r} is a value, not a config group, so there is no {dotted!r}")
        if leaf not in node.__dict__:
            raise _unknown_key(self, dotted, "(--help lists every key)")
        if isinstance(node.__dict__[leaf], CfgNode):
            raise UnknownKeyError(f"{dotted!r} is a config group, not a value; set one of its keys (--help lists them)")
        return node, leaf

    def format_help(self, description=None):
        """Usage, the description (a script's __doc__, say), and every key with its default and type."""
        leaves = [(f"--{path}={value!r}", _type_name(value)) for path, value in _leaves(self)]
        width = max((len(left) for left, _ in leaves), default=0)
        lines = [f"usage: {Path(sys.argv[0]).name} [--help] [--group.key=value ...]", ""]
        if description:
            lines += [description.strip(), ""]
        lines.append("Every key with its default and the type its value is read as (any key also takes None):")
        lines += [f"  {left.ljust(width)}  {kind}" for left, kind in leaves]
        return "\n".join(lines)


def check_device(name, option="--device"):
    """Refuse, naming the option, a device this PyTorch cannot use (cuda on a CPU build, a GPU index beyond the
    machine's, a misspelt name), before a run starts rather than at its first tensor with an AssertionError."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option}={name!r} is not a device: give cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"{option}={name}: this PyTorch ({torch.__version__}) was built without CUDA; use cpu, "
                             f"or install a CUDA build of PyTorch")
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"{option}={name}: this machine has {count} CUDA GPU(s) that PyTorch can see; use cpu or "
                             f"auto" + (f", or cuda:0 to cuda:{count - 1}" if count else ""))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option}={name}: Apple's MPS is not available here; use cpu or auto")


def resolve_device(name):
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup_script(config, args, description=None, modes=None):
    """A project script's config from its command line, checked before any data is read: the overrides merged
    (a --model.preset=NAME first), --trainer.device checked, the seed set from --system.seed and, given modes,
    --system.mode one of them."""
    merge_args(config, args, description=description)
    check_device(config.trainer.device, "--trainer.device")
    set_seed(config.system.seed, "--system.seed")
    if modes is not None and config.system.mode not in modes:
        raise ValueError(f"--system.mode must be {' or '.join(map(repr, modes))}, got {config.system.mode!r}")
    return config


def _error_message(err):
    """An error as one line: a KeyError's message unquoted, lines joined."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    return " ".join(str(text).split("\n"))


def run_main(main, argv=None, prog=None):
    """Run main(argv) (sys.argv[1:] by default) as a command and return its exit status, for
    ``sys.exit(run_main(main))`` at the end of a script. What a user can fix (a missing or bad file, a wrong
    option, a folder in use: OSError, ValueError, TypeError, KeyError, ImportError, CheckpointError) is one line,
    ``prog: error: ...`` on stderr, with status 2 for a UsageError and 1 otherwise, as the mygpt command does;
    Ctrl-C is status 130 without a traceback, a reader that went away (``| head``) ends it quietly. Anything
    else is a bug and keeps its traceback."""
    from mygpt.checkpoint import CheckpointError  # mygpt.checkpoint imports this module

    prog = prog or os.path.basename(sys.argv[0])
    try:
        status = main(sys.argv[1:] if argv is None else argv)
        return status if isinstance(status, int) else 0
    except BrokenPipeError:  # the reader went away: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 1
    except (OSError, ValueError, TypeError, KeyError, ImportError, CheckpointError) as err:
        print(f"{prog}: error: {_error_message(err)}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


class _ConsoleHandler(logging.Handler):
    """Prints log messages above a running tqdm progress bar (never glued to it), on stdout.

    A record logged with extra={"console": False} goes to the other handlers (log.txt) only.
    """

    def emit(self, record):
        if getattr(record, "console", True):
            tqdm.write(self.format(record), file=sys.stdout)


def jsonl_values(source, bad_line):
    """(line number, value) for each non-blank line of a JSON-lines file (a path; or its lines, as a list or an open
    text file, for one read from an archive). A line that is not JSON raises the exception bad_line(line number,
    json's message) returns: each reader words the error for its own users."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            yield from jsonl_values(f, bad_line)
        return
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise bad_line(number, err.msg) from None
        yield number, value


def temporary_name(path):
    """A name beside path, unique to this process and call, for a file that becomes path once whole."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_TEMPORARY = re.compile(r"(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}")  # what temporary_name makes
_STALE_SECONDS = 60  # a temporary untouched this long, of a process gone, was left by a kill


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder, name=None):
    """Remove what a process killed while writing left in folder: the temporaries of name (of every file when
    None) whose process is gone and that were not changed for _STALE_SECONDS (a kill during a checkpoint write
    leaves checkpoint.pt.tmp-PID-HEX, as large as the checkpoint). A live writer's temporary is never touched;
    nor is a fresh one, which could be another machine's on a shared disk, where its PID means nothing here."""
    if os.name != "posix" or not os.path.isdir(folder):
        return
    for entry in os.scandir(folder):
        match = _TEMPORARY.fullmatch(entry.name)
        if not match or (name is not None and match["name"] != name) or not entry.is_file(follow_symlinks=False):
            continue
        if _process_alive(int(match["pid"])) or time.time() - entry.stat().st_mtime < _STALE_SECONDS:
            continue
        try:
            os.remove(entry.path)
        except FileNotFoundError:  # another run cleaned it first
            pass


def check_output_file(path, *inputs):
    """Refuse, before anything is written, an output path that is not a regular file (a folder, a device such as
    /dev/null, a pipe: renaming over it would replace it) or that is one of the command's inputs."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        raise ValueError(f"{path} is {kind}: give the name of a file to write")
    for source in inputs:
        if source is not None and os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise ValueError(f"{path} is also an input of this command ({source}): writing it would destroy what it "
                             f"reads; give another output name")


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside path; once the body has written it, flush it to disk and rename it to path.

    A crash or an error at any moment leaves path as it was (the old file or none) and no temporary behind;
    the error raised is the body's own (disk full says disk full). A path that is not a regular file is refused.
    """
    check_output_file(path)
    tmp = temporary_name(path)
    remove_stale_temporaries(tmp.parent, Path(path).name)  # a killed writer's, of this very file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class InUseError(OSError):
    """A folder that another running process is writing to (a run's work dir, a corpus being prepared)."""


_locks = {}  # folder -> [open descriptor, depth]: this process's locks (it may take one again inside itself)


def _lock_holder(fd):
    """'process PID (its command line)' holding a flock on the open file fd, read from /proc/locks (Linux)."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii") as f:
            pids = [line.split()[4] for line in f if "FLOCK" in line and line.split()[5] == device]
        with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return f"process {pids[0]} ({command})"
    except (OSError, IndexError):
        return "another process"


@contextmanager
def exclusive(folder):
    """Hold folder for this process while the body runs: a second process asking for it is refused at once,
    naming the process that holds it. The lock is the kernel's flock on the folder itself, so nothing is
    written into it, and the lock ends with its process however that dies. Where flock is missing
    (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = os.path.realpath(folder)
    os.makedirs(folder, exist_ok=True)
    if folder not in _locks:
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise InUseError(f"{folder} is in use by {holder}; wait for it to end, or use another folder") from None
        _locks[folder] = [fd, 0]
    _locks[folder][1] += 1
    try:
        yield
    finally:
        _locks[folder][1] -= 1
        if not _locks[folder][1]:
            os.close(_locks.pop(folder)[0])  # closing the descriptor releases the lock


def setup_logging(config):
    """Prepare config.system.work_dir for a run: save the config as JSON, log to the console and to log.txt.

    Returns the "mygpt" logger; calling this again (a second run in one process) replaces its handlers.
    """
    work_dir = Path(config.system.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work_dir)  # what a run killed while saving left behind
    (work_dir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")
    logger = logging.getLogger("mygpt")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the handlers below already print; the root logger must not print twice
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(_ConsoleHandler())
    to_file = logging.FileHandler(work_dir / "log.txt", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(to_file)
    return logger
