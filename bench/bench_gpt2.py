"""
Training speed of GPT-2 124M on this CPU: mygpt against Hugging Face transformers' GPT2LMHeadModel, in one run.

    OMP_NUM_THREADS=2 python bench/bench_gpt2.py                  # batch 1 x 512 tokens, 3 rounds of 2 steps
    OMP_NUM_THREADS=2 python bench/bench_gpt2.py --batch=2 --block=256 --rounds=2 --steps=1

A step is forward + backward + fused AdamW (the same optimizer for both), dropout 0, fp32, on random tokens of
GPT-2's vocabulary; rounds alternate between the models so that the noise of a shared machine hits both alike.
The first step of each model (allocations, warm caches) is not timed.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mygpt, not one installed elsewhere

from mygpt import GPT, CfgNode


def mygpt_step():
    config = GPT.get_default_config()
    config.merge_from_dict(dict(model_type="gpt2", vocab_size=50257, block_size=1024,
                                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    model = GPT(config)
    optimizer = model.configure_optimizers(CfgNode(learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95)))

    def step(x, y):
        _, loss = model(x, y)
        return loss
    return model, optimizer, step


def transformers_step():
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config)  # GPT-2 124M's shape, its head tied
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(x, y):
        logits = model(x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    return model, optimizer, step


def timed_steps(built, x, y, steps):
    model, optimizer, loss_of = built
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (args.batch, args.block))
    y = torch.randint(0, 50257, (args.batch, args.block))
    models = {"mygpt": mygpt_step(), "transformers": transformers_step()}
    for name, built in models.items():
        print(f"{name}: {sum(p.numel() for p in built[0].parameters()) / 1e6:.2f}M parameters")
        timed_steps(built, x, y, 1)  # warm-up
    rates = {name: [] for name in models}
    tokens = args.batch * args.block * args.steps
    for r in range(args.rounds):
        for name in (models if r % 2 == 0 else reversed(list(models))):
            rates[name].append(tokens / timed_steps(models[name], x, y, args.steps))
            print(f"round {r + 1}: {name} {rates[name][-1]:.0f} tokens/s", flush=True)
    print(f"\nGPT-2 124M training, batch {args.batch} x {args.block} tokens, {torch.get_num_threads()} threads "
          f"(median of {args.rounds} rounds of {args.steps} steps):")
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"  {name:13s} {rate:8.0f} tokens/s")
    print(f"  mygpt / transformers: {median['mygpt'] / median['transformers']:.2f}x")


if __name__ == "__main__":
    main()
