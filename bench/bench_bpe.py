"""Speed of mygpt's GPT-2 BPE against tiktoken, Hugging Face `tokenizers` and the plain algorithm, in one run.

Run it alone on the machine (other benchmarks take the same lock), all sections or the ones named:

    flock /tmp/mygpt-bench.lock python bench/bench_bpe.py [encode] [batch] [train] [long-runs] [crossover]

All throughputs are MB of UTF-8 text per second on one thread. "cold" is the first encode by a fresh encoder (an empty
cache, for those that have one); "warm" is the best of a few repeats of the same text. The long-run table gives CPU
seconds (time.process_time), which other work on a shared machine distorts less than wall time.
"""

import gc
import multiprocessing
import os
import sys
import time
from pathlib import Path

# The Rust libraries must not use more threads than the pure-Python code they are compared with.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# tiktoken panics on some long runs (reported in the table); one line on stderr is enough.
os.environ["RUST_BACKTRACE"] = "0"

import regex  # noqa: E402
import tiktoken  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's tests/corpus.py, which no install holds
from mygpt import Encoder, get_encoder, train_bpe  # noqa: E402
# the algorithm's parts, timed and checked against other tokenizers one by one: not a user's API
from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, HEAP_FROM_BYTES, VOCAB_DIR, bytes_to_unicode, merge_in_rank_order  # noqa: E402
from tests.corpus import LONG_RUNS, english_and_code, long_run, mixed_text  # noqa: E402

SHARED = ROOT.parent / "shared/data/gpt2"
GPT2_DIR = SHARED if (SHARED / "encoder.json").is_file() else VOCAB_DIR / "gpt2"
REPEATS = 3


class PlainBPE:
    """The textbook algorithm in plain Python, as the floor: for each pre-token, map its bytes to the vocabulary's
    alphabet, then merge the lowest-ranked pair of strings until none is ranked. `cached` remembers each pre-token's
    result in a dict, as the classic GPT-2 encoder does."""

    def __init__(self, encoder, merges, cached):
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.cache = {} if cached else None
        self.pattern = regex.compile(GPT2_PATTERN)

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            if self.cache is None:
                parts = self.bpe(word)
            else:
                parts = self.cache.get(word) or self.cache.setdefault(word, self.bpe(word))
            ids.extend(self.encoder[p] for p in parts)
        return ids

    def decode(self, ids):
        chars = "".join(self.decoder[i] for i in ids)
        return bytes(self.char_byte[c] for c in chars).decode("utf-8", errors="replace")


class HFTokenizers:
    """`tokenizers` GPT-2: byte-level BPE from encoder.json and vocab.bpe, GPT-2's regex, no added prefix space."""

    def __init__(self):
        bpe = models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe"))
        self.tok = Tokenizer(bpe)
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids)


class Tiktoken:
    def __init__(self):
        ranks = load_tiktoken_bpe(str(SHARED / "gpt2.tiktoken")) if (SHARED / "gpt2.tiktoken").is_file() else None
        self.enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks or self._ranks_from_package(),
                                     special_tokens={ENDOFTEXT: 50256})

    @staticmethod
    def _ranks_from_package():
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        return data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "gpt2/vocab.bpe"), str(VOCAB_DIR / "gpt2/encoder.json"))

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)


def seconds(fn, *args):
    gc.collect()
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def measure(make, text, repeats=REPEATS):
    """(cold MB/s, warm MB/s, decode MB/s, ids) for a fresh encoder made by `make`."""
    mb = len(text.encode("utf-8")) / 1e6
    tokenizer = make()
    cold, ids = seconds(tokenizer.encode, text)
    warm = min(seconds(tokenizer.encode, text)[0] for _ in range(repeats))
    decode = min(seconds(tokenizer.decode, ids)[0] for _ in range(repeats))
    return mb / cold, mb / warm, mb / decode, ids


def fresh_mygpt():
    shipped = get_encoder()
    return Encoder(shipped.encoder, shipped.merges)


def bench_encode_decode(name, text):
    print(f"\n## {name}: {len(text.encode('utf-8')) / 1e6:.2f} MB")
    shipped = get_encoder()
    expected = shipped.encode(text)
    contenders = {
        "mygpt": fresh_mygpt,
        "tiktoken": Tiktoken,
        "tokenizers": HFTokenizers,
        "plain cached": lambda: PlainBPE(shipped.encoder, shipped.merges, cached=True),
        "plain uncached": lambda: PlainBPE(shipped.encoder, shipped.merges, cached=False),
    }
    results = {}
    print(f"{'':16}{'cold':>8}{'warm':>8}{'decode':>8}  (MB/s)  same ids as mygpt")
    for label, make in contenders.items():
        # Without a cache, warm is cold: one repeat is enough for the slowest contender.
        repeats = 1 if label == "plain uncached" else REPEATS
        cold, warm, decode, ids = measure(make, text, repeats)
        results[label] = (cold, warm, decode)
        print(f"{label:16}{cold:8.2f}{warm:8.2f}{decode:8.1f}  {ids == expected}")
    ours = results["mygpt"]
    for label in ("tiktoken", "tokenizers", "plain cached", "plain uncached"):
        cold, warm, decode = (a / b for a, b in zip(ours, results[label]))
        print(f"mygpt / {label:16} cold {cold:5.2f}x  warm {warm:5.2f}x  decode {decode:5.2f}x")
    return results


def spare_cores():
    """How many times faster two processes finish two equal pure-Python loops than one process: near 2 on an idle
    2-core machine, near 1 when other work holds a core. Printed next to the encode_batch speed-up to read it by."""
    n = 3_000_000
    one, _ = seconds(_spin_twice, n)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        two, _ = seconds(pool.map, _spin, [n, n])
    return one / two


def _spin(n):
    return sum(i for i in range(n))


def _spin_twice(n):
    return _spin(n) + _spin(n)


def bench_batch(text, pieces=64):
    """Encode of `text` cut into `pieces` texts by encode_batch with 1 and 2 worker processes, from a cold cache and
    from a warm one (forked workers start with the parent's cache)."""
    size = len(text) // pieces
    texts = [text[i:i + size] for i in range(0, len(text), size)]
    mb = len(text.encode("utf-8")) / 1e6
    print(f"\n## encode_batch, {len(texts)} texts, {mb:.2f} MB (parallelism free now: {spare_cores():.2f}x)")
    for cache in ("cold", "warm"):
        times = {}
        for workers in (1, 2):
            encoder = fresh_mygpt()
            if cache == "warm":
                encoder.encode_batch(texts)
            times[workers], _ = seconds(encoder.encode_batch, texts, workers)
        print(f"{cache}: 1 process {mb / times[1]:6.2f} MB/s   2 processes {mb / times[2]:6.2f} MB/s"
              f"   speed-up {times[1] / times[2]:4.2f}x")


def bench_train(text):
    mb = len(text.encode("utf-8")) / 1e6
    took, enc = seconds(train_bpe, text, 4096)
    print(f"\n## train_bpe: {mb:.2f} MB to {enc.vocab_size} tokens in {took:.2f} s")


def cpu_seconds(fn, *args):
    """(CPU seconds of fn(*args), its result or the exception it raised). tiktoken's regex engine panics (a Rust
    panic, which Python raises as a BaseException) on some long runs; that is reported, not fatal."""
    gc.collect()
    start = time.process_time()
    try:
        result = fn(*args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001
        result = e
    return time.process_time() - start, result


def bench_long_runs(n_chars=1_000_000, vocab_size=4096):
    """Text with no spaces for the pre-tokeniser to cut at: pre-tokens up to n_chars long."""
    print(f"\n## Long runs: {n_chars:,} characters of each kind, one thread, CPU seconds")
    print(f"{'kind':26}{'MB':>6}{'mygpt':>9}{'tiktoken':>10}{'ratio':>8}  same ids  train_bpe to {vocab_size}")
    tk = Tiktoken()
    for kind in LONG_RUNS:
        text = long_run(kind, n_chars)
        ours_s, ours = cpu_seconds(fresh_mygpt().encode, text)
        theirs_s, theirs = cpu_seconds(tk.encode, text)
        train_s, _ = cpu_seconds(train_bpe, text, vocab_size)
        if isinstance(theirs, BaseException):  # the ratio column names the failure
            theirs_text, ratio, same = f"{'failed':>10}", f"  {type(theirs).__name__}", ""
        else:
            theirs_text, ratio, same = f"{theirs_s:10.2f}", f"{ours_s / theirs_s:7.1f}x", str(ours == theirs)
        print(f"{kind:26}{len(text.encode('utf-8')) / 1e6:6.2f}{ours_s:9.2f}{theirs_text}{ratio:>8}  {same:8}"
              f"  {train_s:.2f}")


def bench_crossover(lengths=(3, 4, 6, 8, 10, 12, 16, 24, 32), repeats=5):
    """Microseconds per pre-token for whole passes and for the rank-ordered merge, by length in bytes: on the
    distinct words of prose and code, and on random letters. Sets HEAP_FROM_BYTES in mygpt/bpe.py."""
    enc = get_encoder()
    words = {}
    for piece in set(regex.findall(GPT2_PATTERN, english_and_code(1_000_000))):
        words.setdefault(len(piece.encode("utf-8")), []).append(piece.encode("utf-8"))
    print(f"\n## Merge path crossover (HEAP_FROM_BYTES = {HEAP_FROM_BYTES}): us per pre-token, CPU time")
    print(f"{'bytes':>5}{'words':>7}{'passes':>9}{'ranked':>9}   random letters:{'passes':>9}{'ranked':>9}")

    def per_piece(merge, samples):
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for ids in samples:
                merge(list(ids))
            best = min(best, time.process_time() - start)
        return best / len(samples) * 1e6

    def ranked(ids):
        return merge_in_rank_order(ids, enc._rank_of, enc._merge_of)

    for n in lengths:
        real = words.get(n, [])[:300]
        letters = [long_run("random letters", n, seed=s).encode("ascii") for s in range(300)]
        cells = []
        for samples in (real, letters):
            ids = [[enc._byte_ids[b] for b in data] for data in samples]
            few = len(ids) < 20  # too few distinct words of this length to time
            timed = "" if few else f"{per_piece(enc._merge, ids):9.1f}{per_piece(ranked, ids):9.1f}"
            cells.append(timed or f"{'-':>9}{'-':>9}")
        print(f"{n:5}{len(real):7}{cells[0]}   {'':15}{cells[1]}")


SECTIONS = {
    "encode": lambda: (bench_encode_decode("English prose + Python code", english_and_code(3_000_000)),
                       bench_encode_decode("mixed: prose, code, many scripts, emoji, numbers", mixed_text(1_000_000))),
    "batch": lambda: bench_batch(english_and_code(3_000_000) + mixed_text(2_000_000, seed=1)),
    "train": lambda: bench_train(english_and_code(1_100_000)),
    "long-runs": bench_long_runs,
    "crossover": bench_crossover,
}


def main():
    names = sys.argv[1:] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    for name in names:
        SECTIONS[name]()


if __name__ == "__main__":
    main()
