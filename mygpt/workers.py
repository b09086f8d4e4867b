"""Worker processes that apply a function to a stream of items and give the results back in the items' order.

`with ordered_map(function, state, workers, unfinished) as mapped:` gives `mapped(items)`, an iterator of
`function(state, item)` for each item, in order. mygpt's parallel encoding runs on it: prepare_corpus's
(mygpt/prepare.py) and Encoder.encode_batch's (mygpt/bpe.py).

- `state` (the tokenizer) goes to each process once, as it starts: forked where the platform can, so that a process
  starts with it, and with all it has cached, at no cost; only items and results travel.
- At most 2 x `workers` items are in flight, so memory stays bounded however many items come (Pool.imap would read
  all of them in advance).
- A worker that dies (killed by the kernel's OOM killer, say) raises ChildProcessError naming it; a Pool would
  replace it and wait forever for the item it held.
- Ctrl-C and SIGTERM are the main process's to handle; on an error the pool ends with SIGTERM, which ends a worker at
  once and quietly (not with a KeyboardInterrupt or BrokenPipeError traceback from each). Done, the workers exit.
- One worker is this process: no pool.
"""

import multiprocessing
import signal
from collections import deque
from contextlib import contextmanager

_state = None  # in a worker process: the state its items are processed with


def _start(state):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    global _state
    _state = state


def _apply(function, item):
    return function(_state, item)


@contextmanager
def ordered_map(function, state, workers, unfinished):
    """Within: mapped(items) -> function(state, item) for each item, in order, computed by `workers` processes.
    `function` is a module-level function (it travels by name); `unfinished` ends the message of a dead worker: what
    it leaves unfinished and what to do ("before prepare finished; run the same prepare again ...")."""
    if workers == 1:
        yield lambda items: (function(state, item) for item in items)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    others = set(multiprocessing.active_children())
    pool = context.Pool(workers, initializer=_start, initargs=(state,))
    processes = [p for p in multiprocessing.active_children() if p not in others]
    try:
        yield lambda items: _in_order(pool, processes, function, items, 2 * workers, unfinished)
    except BaseException:  # an error or an interruption: no time to wait for the queue
        pool.terminate()
        pool.join()
        raise
    # Done: each worker reads its end-of-work mark and exits. Not terminate(): its SIGTERM can reach a worker still
    # being forked, whose Python forgets the signal after the fork (then pool.join() waits forever), and a short
    # run finishes that soon.
    pool.close()
    pool.join()


def _in_order(pool, processes, function, items, ahead, unfinished):
    """The results of `function` over `items` in `pool`, in order, at most `ahead` items in flight."""
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(_apply, (function, item)))
        if len(pending) >= ahead:
            yield _result(pending.popleft(), processes, unfinished)
    while pending:
        yield _result(pending.popleft(), processes, unfinished)


def _result(pending, processes, unfinished):
    """An AsyncResult's value; ChildProcessError once one of `processes` has died."""
    while not pending.ready():
        pending.wait(0.2)
        dead = next((p for p in processes if p.exitcode is not None), None)
        if dead is not None:
            code = dead.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            raise ChildProcessError(f"encoding process {dead.pid} {how} (out of memory?) {unfinished}")
    return pending.get()
