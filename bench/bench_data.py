"""Token corpora: prepare throughput against nanoGPT's way, the loader against the model, and the cost of a corpus's
size before the first training step.

    flock /tmp/mygpt-bench.lock env OMP_NUM_THREADS=1 python bench/bench_data.py [--only=prepare,loader,startup]

- prepare: MB/s of UTF-8 text, from a .jsonl file to finished shards, by prepare_corpus with 1 and 2 processes and by
  nanoGPT's way in one process (tiktoken's encode_ordinary per document, + <|endoftext|>, then
  np.array(ids, dtype=np.uint16).tofile), on the same documents. mygpt's BPE caches the ids of each pre-token, so its
  first pass over a text ("cold") is slower than later ones ("warm": the cache has met the text's words, as it has
  on a long corpus after its first megabytes); both are shown.
- loader: TokenDataset batches of 16 random windows of 1024 tokens per second, from a sparse 10^10-token corpus and
  from a 10^8-token corpus of real data in the page cache, against how many batches per second the model consumes at
  GPT-2 shape (124M) on this CPU: forward + backward at batch 1, times 16.
- startup: seconds to the end of the first training step and peak RSS (VmHWM) of a fresh process that opens a
  corpus of 10^7 .. 10^10 tokens (sparse shards) and runs Trainer(max_iters=1) on a tiny model.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's tests/corpus.py, which no install holds (and so its mygpt, as the child's)
from mygpt import GPT, TokenDataset, get_encoder, prepare_corpus, write_shard  # noqa: E402
from tests.corpus import english_prose, multilingual, python_code  # noqa: E402

EOT = 50256
SHARD = 2 * 10**9  # tokens per sparse shard (llm.c's int32 count allows up to 2**31 - 1)


# ---------------------------------------------------------------------------------------------------- prepare

def documents(doc_chars=4000):
    """About 3.5 MB of text as documents of about doc_chars characters, cut at blank lines."""
    text = "\n\n".join([english_prose(10**7), python_code(10**7), multilingual(10**6, seed=0)])
    docs, current = [], []
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        if sum(map(len, current)) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    return docs + ["\n\n".join(current)]


def nanogpt_way(jsonl, out):
    """nanoGPT's preparation: tiktoken encode_ordinary per document, append <|endoftext|>, np.array(...).tofile."""
    from tests.test_bpe import tiktoken_gpt2
    enc = tiktoken_gpt2()
    ids = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids.extend(enc.encode_ordinary(json.loads(line)["text"]))
            ids.append(EOT)
    np.array(ids, dtype=np.uint16).tofile(out)
    return len(ids)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_prepare(folder, rounds=3):
    docs = documents()
    jsonl = folder / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"\n== prepare: {len(docs):,} documents, {mb:.2f} MB of text, torch threads {torch.get_num_threads()}; "
          f"best of {rounds} rounds, the ways taking turns")
    encoder = get_encoder()
    out = iter(folder / f"out{i}" for i in range(1000))

    def ours(workers, cache):
        if cache == "cold":
            encoder._cache.clear()  # forked workers start with the parent's cache: empty here
        else:
            prepare_corpus(jsonl, next(out), val_fraction=0, num_workers=1, progress=False)
        return lambda: prepare_corpus(jsonl, next(out), val_fraction=0, num_workers=workers,
                                      progress=False)["train"]["tokens"]

    def encoder_alone(cache):
        if cache == "cold":
            encoder._cache.clear()
        return lambda: sum(len(encoder.encode_ordinary(d)) + 1 for d in docs)  # + one <|endoftext|> each

    ways = {"nanoGPT's way (tiktoken + np.array.tofile), 1 process": lambda: lambda: nanogpt_way(jsonl, next(out))}
    for workers in (1, 2):
        for cache in ("cold", "warm"):
            name = f"mygpt prepare_corpus, {workers} process{'es' if workers > 1 else ''}, {cache} cache"
            ways[name] = lambda workers=workers, cache=cache: ours(workers, cache)
    for cache in ("cold", "warm"):
        ways[f"mygpt Encoder.encode_ordinary alone, 1 process, {cache} cache"] = lambda c=cache: encoder_alone(c)
    best = {name: float("inf") for name in ways}
    for _ in range(rounds):
        for name, setup in ways.items():
            run = setup()
            seconds, tokens = timed(run)
            best[name] = min(best[name], seconds)
            assert tokens == best.setdefault("tokens", tokens), f"{name} gives another number of tokens"
    tokens = best.pop("tokens")
    reference = mb / best[next(iter(ways))]
    for name, seconds in best.items():
        print(f"{name:62s} {mb / seconds:6.2f} MB/s  {mb / seconds / reference:5.2f}x nanoGPT's way")
    print(f"{tokens:,} tokens in each (equal ids: tests/test_data.py checks prepare against tiktoken)")


# ---------------------------------------------------------------------------------------------------- loader

def sparse_corpus(folder, tokens):
    """Shards of at most SHARD tokens whose header says `tokens` in all; sparse, so they take no disk."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, tokens, SHARD)):
        count = min(SHARD, tokens - start)
        header = np.zeros(256, dtype="<i4")
        header[:3] = 20240520, 1, count
        with open(folder / f"train_{i:06d}.bin", "wb") as f:
            f.write(header.tobytes())
            f.truncate(1024 + 2 * count)
    return str(folder / "train_*.bin")


def batches_per_second(fetch, n_windows, seed, seconds=3.0):
    """Batches of 16 random windows per second; each measurement its own seed, so that no page it reads has been
    read before (a page cache warmed by an earlier measurement would flatter the later one)."""
    rng = np.random.default_rng(seed)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fetch(rng.integers(0, n_windows, size=16))
        n += 1
    return n / (time.perf_counter() - start)


def via_getitem(ds):
    """What the Trainer's DataLoader does: one __getitem__ per window, then default_collate."""
    return lambda indices: torch.utils.data.default_collate([ds[int(i)] for i in indices])


def nanogpt_get_batch(path, block=1024):
    """nanoGPT's train.py get_batch on one file: a fresh np.memmap per batch (its fix for memory growth), then
    torch.stack of each window converted to int64; the same windows as TokenDataset's (stride block, offset 1024)."""
    def fetch(indices):
        data = np.memmap(path, dtype=np.uint16, mode="r", offset=1024)
        x = torch.stack([torch.from_numpy(data[i * block:i * block + block].astype(np.int64)) for i in indices])
        y = torch.stack([torch.from_numpy(data[i * block + 1:i * block + 1 + block].astype(np.int64))
                         for i in indices])
        return x, y
    return fetch


def model_batches_per_second(repeats=2):
    """Batches of 16 x 1024 per second that GPT-2 (124M) trains on here: forward + backward at batch 1, / 16."""
    C = GPT.get_default_config()
    C.model_type, C.vocab_size, C.block_size = "gpt2", 50257, 1024
    model = GPT(C)
    x = torch.randint(0, 50257, (1, 1024))
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        start = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1 / (16 * min(times[1:]))


def bench_loader(folder):
    print(f"\n== loader: batch 16 x block 1024, random windows, torch threads {torch.get_num_threads()}")
    model = model_batches_per_second()
    print(f"{'model: GPT-2 124M forward+backward (batch 1 x 1024, / 16)':62s} {model:9.4f} batches/s")
    dense = folder / "dense"
    dense.mkdir()
    write_shard(dense / "train_000000.bin", np.random.default_rng(0).integers(0, 50257, size=10**8))
    corpora = {
        "sparse 10^10 tokens (5 shards), pages never read before": sparse_corpus(folder / "sparse", 10**10),
        "sparse 2*10^9 tokens (1 shard), pages never read before": sparse_corpus(folder / "one", SHARD),
        "dense 10^8 tokens, in the page cache": str(dense / "train_000000.bin"),
    }
    seed = 0
    for name, pattern in corpora.items():
        ds = TokenDataset(pattern, block_size=1024)
        ways = {"TokenDataset.get_batch": ds.get_batch, "TokenDataset[i] + collate (Trainer)": via_getitem(ds)}
        if len(ds.paths) == 1:
            ways["nanoGPT get_batch (np.memmap per batch)"] = nanogpt_get_batch(ds.paths[0])
        print(name)
        for how, fetch in ways.items():
            seed += 1
            rate = batches_per_second(fetch, len(ds), seed)
            print(f"  {how:60s} {rate:9.1f} batches/s  {rate / model:11,.0f}x the model")


# ---------------------------------------------------------------------------------------------------- startup

CHILD = """
import sys, time
start = time.perf_counter()
sys.path.insert(0, {root!r})
import torch
from mygpt import GPT, Trainer, TokenDataset
imported = time.perf_counter()
ds = TokenDataset({pattern!r}, block_size=64)
opened = time.perf_counter() - imported
C = GPT.get_default_config()
C.model_type, C.vocab_size, C.block_size = "gpt-nano", 50257, 64
T = Trainer.get_default_config()
T.device, T.max_iters, T.batch_size, T.quiet, T.log_interval = "cpu", 1, 8, True, 0
trainer = Trainer(T, GPT(C), ds)
first = []
trainer.add_callback("on_batch_end", lambda t: first.append(time.perf_counter() - imported))
trainer.run()
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(imported - start, opened, first[0], peak / 1024, len(ds))
"""


def bench_startup(folder, repeats=3):
    print(f"\n== startup: a fresh process opens the corpus and trains one step of gpt-nano (block 64, batch 8); "
          f"best of {repeats}, times counted from the end of the imports")
    rows = []
    for exponent in (7, 8, 9, 10):
        pattern = sparse_corpus(folder / f"startup{exponent}", 10**exponent)
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), pattern=pattern)],
                                 capture_output=True, text=True, check=True).stdout.split()
            runs.append([float(v) for v in out])
        imports, opened, first, peak, windows = (min(column) for column in zip(*runs))
        rows.append((exponent, windows, opened, first, peak))
        print(f"10^{exponent:<2d} tokens, {int(windows):>13,} windows: imports {imports:5.2f} s, dataset open "
              f"{opened * 1000:6.1f} ms, first step done {first:5.2f} s, peak RSS {peak:6.1f} MiB")
    print(f"largest vs smallest: time to first step x{rows[-1][3] / rows[0][3]:.2f}, "
          f"peak RSS {rows[-1][4] - rows[0][4]:+.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="prepare,loader,startup")
    parts = parser.parse_args().only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name, bench in (("prepare", bench_prepare), ("loader", bench_loader), ("startup", bench_startup)):
            if name in parts:
                folder = Path(tmp) / name
                folder.mkdir()
                bench(folder)


if __name__ == "__main__":
    main()
