"""
Decoding speed of mygpt against llama.cpp, the engine people run small models with on a CPU, in one run.

    python bench/bench_llamacpp.py                # 1 thread and all cores, 5 interleaved rounds
    python bench/bench_llamacpp.py --threads 1    # about 5 minutes on 2 cores loaded by other work
    python bench/bench_llamacpp.py --threads 2 --rounds 2   # 15 minutes there: 2 threads on busy cores crawl
    python bench/bench_llamacpp.py --no-mmap      # llama.cpp reads its weights into ordinary memory

llama.cpp runs through llama-cpp-python, which is optional and builds llama.cpp from its source for this CPU
(about 20 minutes on 2 cores):

    CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python==0.3.36

The model: GPT-2 124M's shape (12 layers, 12 heads, 768 wide, GPT-2's vocabulary, block 1024) with random
weights from seed 0, written by mygpt.export_gguf at f32, f16 and q8_0. Each precision is paired with mygpt's
nearest: fp32 with f32; int8 (model.quantize(), int8 weights, one scale per row) with q8_0 (int8, one scale per
32 weights); bf16 with f16, where mygpt's bf16 is precision='bf16' for inference (`mygpt sample --precision
bf16`): the fp32 model in bf16 autocast, whose Linear layers keep a bf16 copy of their weights.

Both decode greedily, batch 1, from the same 16 prompt token ids, NEW_TOKENS new tokens, in their Python token
loops (mygpt.stream; llama-cpp-python's Llama.generate with temp=0, llama.cpp's greedy sampler), timed alike:
the first new token comes out of the prompt's pass, and tokens/s counts only the NEW_TOKENS - 1 one-token
steps after it, from the first token's arrival to the last's (sampling included for both). The prompt's pass
(prefill and the first token) is shown apart, in ms. Beside llama.cpp's rate, its own clock of the same steps
(llama_perf_context's t_eval, without the Python loop and the sampler). Each engine gets the same thread count:
torch.set_num_threads, Llama(n_threads=, n_threads_batch=). Rounds alternate over the thread counts, the
precisions and the two engines (which one goes first alternates too), so that load from elsewhere falls on all
alike; medians (min-max) are reported. "Same tokens": how many of the NEW_TOKENS greedy tokens the two engines
agree on before the first difference (after one, each continues from a different sequence). "Products only":
mygpt's rate if a step did nothing but its matrix-vector products (every Linear once, on a random row), which
bounds what the rest of mygpt's step (attention, norms, the cache, Python) could give back.

use_extra_bufts=False: llama.cpp's extra CPU buffer types (AMX and repacked weight layouts) crash on q8_0 on
some AMX Xeons, so the model is loaded without them (--extra-bufts keeps llama.cpp's default). Llama() takes no
argument for it: llama_model_default_params, where Llama() reads its model parameters, answers with it set.
llama.cpp maps the GGUF file (use_mmap, its default), so where the page cache holds the file in huge pages
(Linux's large folios) its weights are read through them; --no-mmap reads them into ordinary memory instead.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mygpt, not one installed elsewhere

import torch  # noqa: E402

from machine import cpu_description  # noqa: E402
from mygpt import GPT, Int8Linear, export_gguf, precision_context, stream  # noqa: E402

SHAPE = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)  # GPT-2 124M
PROMPT_TOKENS = 16
NEW_TOKENS = 96
N_CTX = 128  # llama.cpp's context: the prompt and the new tokens
PAIRS = (("fp32", "f32"), ("int8", "q8_0"), ("bf16", "f16"))  # mygpt's precision, llama.cpp's GGUF dtype


def mygpt_models():
    """{precision: (model, the precision it decodes in)}, all from the same fp32 weights (seed 0)."""
    torch.manual_seed(0)
    config = GPT.get_default_config()
    config.merge_from_dict(SHAPE)
    model = GPT(config).eval()
    return {"fp32": (model, "fp32"), "int8": (model.quantize(), "fp32"), "bf16": (model, "bf16")}


def load_llama(path, threads, extra_bufts, mmap):
    """llama_cpp.Llama on the GGUF file at path, with use_extra_bufts as asked (see the docstring)."""
    import llama_cpp
    api = llama_cpp.llama_cpp  # the C API module: Llama() calls its llama_model_default_params
    defaults = api.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p
    api.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, use_mmap=mmap,
                               verbose=False)
    finally:
        api.llama_model_default_params = defaults


def has_extra_bufts_option():
    import llama_cpp
    return "use_extra_bufts" in dict(llama_cpp.llama_model_params._fields_)


def decode_mygpt(model, precision, prompt):
    """(tokens, prompt s, steps s, None) of one greedy run; see the docstring for what is timed."""
    tokens = []
    start = time.perf_counter()
    with precision_context(precision):
        for token in stream(model, torch.tensor([prompt]), NEW_TOKENS):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
    return tokens, first - start, time.perf_counter() - first, None


def products_only(model, precision):
    """(None, None, s, None): the matrix-vector products of NEW_TOKENS - 1 decoding steps and nothing else."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    rows = {n: torch.randn(1, 1, n) for n in {m.in_features for m in layers}}
    with torch.inference_mode(), precision_context(precision):
        for layer in layers:  # bf16's copies are made at a layer's first call: not timed, as in decoding
            layer(rows[layer.in_features])
        start = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            for layer in layers:
                layer(rows[layer.in_features])
        return None, None, time.perf_counter() - start, None


def decode_llama(llm, prompt):
    """(tokens, prompt s, steps s, llama.cpp's own clock of the steps in s) of one greedy run."""
    import llama_cpp
    llm.reset()  # the whole prompt again: nothing kept from the run before
    llama_cpp.llama_perf_context_reset(llm.ctx)
    tokens = []
    start = time.perf_counter()
    for token in llm.generate(prompt, temp=0.0):
        tokens.append(token)
        if len(tokens) == 1:
            first = time.perf_counter()
        if len(tokens) == NEW_TOKENS:
            break
    end = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    assert perf.n_eval == NEW_TOKENS - 1, perf.n_eval  # one-token steps only, as mygpt's
    return tokens, first - start, end - first, perf.t_eval_ms / 1e3


def agreement(a, b):
    """How many tokens a and b agree on before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(runs, thread_counts, rounds):
    """{(threads, name): [(tokens, prompt s, steps s, own s), ...]}: a first run each, then interleaved rounds."""
    results = {key: [] for key in runs}
    for r in range(rounds + 1):  # round 0 warms up; its tokens are kept, its times dropped below
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for mine, theirs in PAIRS:
                names = (mine, f"{mine} products", theirs)
                for name in (names if r % 2 else names[::-1]):
                    results[threads, name].append(runs[threads, name]())
    return results


def rate(seconds):
    return (NEW_TOKENS - 1) / seconds


def median_rate(runs):
    """The median and the range of the timed runs' tokens/s, as text."""
    rates = [rate(steps) for _, _, steps, _ in runs[1:]]
    return f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})", statistics.median(rates)


def report(results, thread_counts):
    for threads in thread_counts:
        print(f"\n{threads} thread{'s' if threads > 1 else ''}: tokens/s, median (min-max)")
        print(f"{'mygpt':<7}{'llama.cpp':<11}{'mygpt':>20}{'products only':>15}{'llama.cpp':>20}{'own clock':>11}"
              f"{'mygpt/llama':>13}{'prompt ms':>13}{'same tokens':>13}")
        for mine, theirs in PAIRS:
            ours, their = results[threads, mine], results[threads, theirs]
            ours_text, ours_rate = median_rate(ours)
            their_text, their_rate = median_rate(their)
            products = median_rate(results[threads, f"{mine} products"])[1]
            own = statistics.median(rate(clock) for *_, clock in their[1:])
            prompt_ms = "{:.0f}, {:.0f}".format(*(1e3 * statistics.median(p for _, p, _, _ in runs[1:])
                                                  for runs in (ours, their)))
            same = f"{agreement(ours[0][0], their[0][0])} of {NEW_TOKENS}"
            print(f"{mine:<7}{theirs:<11}{ours_text:>20}{products:>15.1f}{their_text:>20}{own:>11.1f}"
                  f"{ours_rate / their_rate:>12.2f}x{prompt_ms:>13}{same:>13}")
            for name, runs in ((mine, ours), (theirs, their)):  # greedy decoding repeats itself exactly
                if any(tokens != runs[0][0] for tokens, *_ in runs):
                    print(f"  note: {name}'s tokens differed between rounds")
        first = {name: results[threads, name][0][0] for pair in PAIRS for name in pair}
        print("each engine's lower precisions against its own 32-bit tokens, the same before the first difference: "
              + ", ".join(f"{name} {agreement(first[name], first[full])}" for pair in PAIRS[1:]
                          for name, full in zip(pair, PAIRS[0])))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts, comma-separated")
    parser.add_argument("--extra-bufts", action="store_true", help="keep llama.cpp's extra CPU buffer types")
    parser.add_argument("--no-mmap", action="store_true", help="llama.cpp reads the weights instead of mapping them")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench_llamacpp needs llama-cpp-python: CMAKE_ARGS=-DGGML_NATIVE=ON pip install "
                         "llama-cpp-python==0.3.36 (it builds llama.cpp, about 20 minutes on 2 cores)") from None
    thread_counts = sorted({int(n) for n in args.threads.split(",")})
    extra = "llama.cpp's default" if args.extra_bufts else (
        "False" if has_extra_bufts_option() else "not an option in this version")
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {cpu_description()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load {os.getloadavg()[0]:.2f} at the start")
    print(f"GPT-2 124M's shape, random weights; greedy, batch 1, {PROMPT_TOKENS} prompt tokens, {NEW_TOKENS} new; "
          f"llama.cpp: use_extra_bufts {extra}, use_mmap {not args.no_mmap}; {args.rounds} interleaved rounds "
          f"after a first run")
    models = mygpt_models()
    prompt = torch.randint(SHAPE["vocab_size"], (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    runs, llms = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for mine, theirs in PAIRS:
            path = export_gguf(models["fp32"][0], Path(tmp) / f"gpt2-{theirs}.gguf", dtype=theirs)
            for threads in thread_counts:
                llm = load_llama(path, threads, args.extra_bufts, not args.no_mmap)
                llms.append(llm)
                runs[threads, mine] = lambda m=models[mine]: decode_mygpt(*m, prompt)
                runs[threads, f"{mine} products"] = lambda m=models[mine]: products_only(*m)
                runs[threads, theirs] = lambda llm=llm: decode_llama(llm, prompt)
        try:
            results = measure(runs, thread_counts, args.rounds)
        finally:
            for llm in llms:
                llm.close()
    report(results, thread_counts)
    print(f"\nload {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
