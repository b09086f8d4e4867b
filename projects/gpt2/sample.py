"""
Sample text from a run of projects/gpt2/train.py or from GPT-2's weights, decoded with GPT-2's BPE.

    python projects/gpt2/sample.py --prompt="ROMEO:" --num_samples=3             # the run in ./out/gpt2 (best.pt)
    python projects/gpt2/sample.py --init_from=gpt2-xl --prompt="What is the answer to life?"
    python projects/gpt2/sample.py --init_from=path/to/checkpoint.pt --prompt_file=prompts.txt --seed=7

--init_from: resume (the work dir's best.pt, else its checkpoint.pt), a checkpoint file, gpt2, gpt2-medium, gpt2-large,
gpt2-xl (needs network once) or a folder written by transformers' save_pretrained. --prompt_file: one prompt per
line, or a .json file holding a list of prompts (for prompts with newlines). An empty prompt starts a new document
at <|endoftext|>; a sample ends at <|endoftext|> unless --stop=False. --int8_layers: for an int8 checkpoint
(`mygpt quantize`), "auto" runs the int8 kernel where it is measured faster, "all" everywhere (the same numbers on
every machine), as `mygpt sample --int8-layers` does.
"""

import json
import os
import sys

import torch

from mygpt import (GPT, GPT2_NAMES, SAMPLE_SEPARATOR, CfgNode, check_device, generate_texts, load_tokenizer,
                   open_checkpoint, resolve_device, run_main)


def get_config():
    """nanoGPT's sample.py defaults."""
    return CfgNode(init_from="resume", work_dir="./out/gpt2", prompt="\n", prompt_file=None, num_samples=3,
                   max_new_tokens=200, temperature=0.8, top_k=200, top_p=None, seed=1337, device="cpu", stop=True,
                   int8_layers="auto")


def load_model(config):
    """(model in eval mode, tokenizer) for config.init_from."""
    source = config.init_from
    if source in GPT2_NAMES or os.path.isdir(source):
        return GPT.from_pretrained(source), load_tokenizer({"type": "gpt2"})
    if source == "resume":
        source = config.work_dir  # its best.pt, else checkpoint.pt
        if not os.path.isdir(source):
            raise FileNotFoundError(f"{source} holds no best.pt or checkpoint.pt: train first, point --work_dir at "
                                    f"a run, or give --init_from=gpt2 (or a checkpoint or folder)")
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"--init_from={source!r} is not resume, a checkpoint file, one of "
                                f"{', '.join(GPT2_NAMES)} or a folder written by save_pretrained")
    model, tokenizer, _ = open_checkpoint(source, int8_layers=config.int8_layers)
    return model, tokenizer or load_tokenizer({"type": "gpt2"})


def read_prompts(config):
    if config.prompt_file is None:
        return [config.prompt]
    with open(config.prompt_file, encoding="utf-8") as f:
        if config.prompt_file.endswith(".json"):
            prompts = json.load(f)
            if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
                raise ValueError(f"--prompt_file {config.prompt_file} must hold a JSON list of strings")
            return prompts
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt_file {config.prompt_file} holds no prompt")
    return prompts


def check_config(C):
    for key in ("num_samples", "max_new_tokens"):
        value = getattr(C, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{key} must be a positive int, got {value!r}")
    if isinstance(C.seed, bool) or not isinstance(C.seed, int) or not 0 <= C.seed < 2**64:
        raise ValueError(f"--seed must be an int from 0 to 2**64 - 1, got {C.seed!r}")  # what torch's generator takes


def main(args):
    config = get_config()
    config.merge_from_args(args, description=__doc__)
    check_config(config)
    check_device(config.device)
    device = resolve_device(config.device)
    model, tokenizer = load_model(config)
    model.to(device)
    generator = torch.Generator(device).manual_seed(config.seed)
    first = True
    for prompt in read_prompts(config):
        for text in generate_texts(model, tokenizer, prompt, config.max_new_tokens, config.temperature,
                                   config.top_k, config.top_p, config.num_samples, generator, config.stop):
            if not first:
                print(SAMPLE_SEPARATOR)
            print(text)
            first = False


if __name__ == "__main__":
    sys.exit(run_main(main))  # the library's errors as one line, `NAME: error: ...`, as the mygpt command prints them
