"""
Export a GPT to the formats other tools run: a Hugging Face `transformers` directory and a GGUF file
(llama.cpp, ollama), each as one of three architectures, chosen by the model's switches:

    GPT-2   learned positions, LayerNorm, GELU, biases        GPT2LMHeadModel; llama.cpp's gpt2
    Llama   pos_emb='rope', norm='rmsnorm', mlp='swiglu',      LlamaForCausalLM; llama.cpp's llama
            bias=False
    Qwen3   the same with qk_norm=True                         Qwen3ForCausalLM; llama.cpp's qwen3

    export_hf(model, "out/hf")                          # AutoModelForCausalLM / AutoTokenizer .from_pretrained("out/hf")
    export_gguf(model, "out/model.gguf", dtype="q8_0")  # "f32", "f16" or "q8_0"

Tied or untied heads, grouped-query attention (Llama, Qwen3), any rope_base and mlp_hidden (Llama, Qwen3) and
zero_init (a starting point only) export. Refused, naming each switch the nearest architecture cannot represent:
what none of the three holds (time weighting, token shift, embd_norm, a logit cap) and mixtures of theirs (RMSNorm
with learned positions, ReLU² or biases with rotary ones, no positions ...), an int8 model from mygpt.quantize
(export the fp32 one), and a tokenizer GPT-2's cannot stand for (a character vocabulary, another split pattern,
more tokens than the model has): every architecture ships GPT-2's byte-level BPE. tokenizer=None writes the
weights alone: transformers then loads the model but AutoTokenizer has nothing to load, and llama.cpp needs the
tokenizer to turn text into ids.

GPT-2's original code keeps its four projections as Conv1D with weights (in, out); transformers kept that
layout, so those weights are transposed on the way out. GGUF stores matrices (out, in) like nn.Linear.
mygpt/export_llama.py holds the Llama and Qwen3 tables.
"""

import json
import re
from pathlib import Path

from mygpt import export_llama
from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN
from mygpt.pretrained import CONV1D_WEIGHTS
from mygpt.quantize import is_quantized
from mygpt.tokenizer import describe_tokenizer, load_tokenizer
from mygpt.utils import atomic_path


# ---------------------------------------------------------------- which architecture holds the model

# The switches each architecture holds in one setting only; the others (tie_weights, zero_init, rope_base, and for
# Llama and Qwen3 also n_kv_head and mlp_hidden) take any value. n_kv_head=None is n_kv_head=n_head.
_ARCHITECTURES = {
    "GPT-2": dict(pos_emb="learned", norm="layernorm", qk_norm=False, mlp="gelu", mlp_hidden=None, n_kv_head=None,
                  bias=True),
    "Llama": dict(pos_emb="rope", norm="rmsnorm", qk_norm=False, mlp="swiglu", bias=False),
    "Qwen3": dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", bias=False),
}
# The switches none of them holds: the setting all three have, and what they do not do
_IN_NONE = {
    "time_weighting": (None, "reweights attention probabilities"),
    "token_shift": (False, "takes channels from the previous position"),
    "embd_norm": (False, "normalises the embedding"),
    "logit_softcap": (None, "caps its logits"),
}


def _differences(c, architecture):
    """One phrase for each switch of config c that `architecture` cannot represent."""
    reasons = [f"{key}={getattr(c, key)!r} (none of GPT-2, Llama and Qwen3 {what})"
               for key, (setting, what) in _IN_NONE.items() if getattr(c, key) != setting]
    for key, setting in _ARCHITECTURES[architecture].items():
        ours = None if key == "n_kv_head" and c.n_kv_head == c.n_head else getattr(c, key)
        if ours != setting:
            reasons.append(f"{key}={getattr(c, key)!r} ({architecture} has {key}={setting!r})")
    return reasons


def export_architecture(model, target="Hugging Face transformers or GGUF"):
    """'GPT-2', 'Llama' or 'Qwen3': the architecture that holds model exactly. A ValueError when none does,
    naming every switch that the nearest one (the fewest differences) cannot represent; target names the format."""
    if is_quantized(model):
        raise ValueError(f"cannot export an int8 model to {target}: export the fp32 model it was quantized from")
    differences = {architecture: _differences(model.config, architecture) for architecture in _ARCHITECTURES}
    nearest = min(differences, key=lambda architecture: len(differences[architecture]))  # ties: the first
    if differences[nearest]:
        raise ValueError(f"cannot export to {target}: of its architectures (GPT-2, Llama, Qwen3) the nearest, "
                         f"{nearest}, cannot represent " + "; ".join(differences[nearest]))
    return nearest


def _is_tied(model):
    return model.lm_head.weight is model.transformer.wte.weight


def _gpt2_encoder(tokenizer, vocab_size, target):
    """The BPE Encoder to ship (GPT-2's or one trained with GPT-2's pattern), or None for tokenizer=None."""
    if tokenizer is None:
        return None
    description = describe_tokenizer(tokenizer)
    if description["type"] == "chars":
        raise ValueError(f"cannot ship a character vocabulary to {target}: it holds only GPT-2's byte-level BPE. "
                         f"Pass tokenizer=None to export the weights alone")
    encoder = load_tokenizer(description).encoder
    if encoder.pattern != GPT2_PATTERN:
        raise ValueError(f"cannot ship this BPE vocabulary to {target}: it splits text with its own pattern, and "
                         f"GPT-2's tokenizer always uses GPT-2's. Pass tokenizer=None to export the weights alone")
    if encoder.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {encoder.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
                         f"pass the tokenizer the model was trained with, or tokenizer=None for the weights alone")
    return encoder


# What transformers reads from a model folder and save_pretrained writes there (and a killed export's temporary
# files): an export into an earlier one replaces these names, and no other file is ever deleted.
_HF_FOLDER_FILES = re.compile(
    r"((config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|chat_template)\.json"
    r"|merges\.txt|chat_template\.jinja"
    r"|(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?)"
    r"(\.tmp-\d+-[0-9a-f]{8})?")


def _empty_export_folder(out_dir, overwrite):
    """Make out_dir an empty folder for an export, so that it holds exactly what the export writes (an old
    tokenizer.json would otherwise be what AutoTokenizer loads). A new or empty folder is used as it is; one holding
    an earlier export or save_pretrained (only _HF_FOLDER_FILES) is emptied with overwrite=True and refused without;
    one holding any other file is refused either way, and nothing in it is touched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    present = sorted(out_dir.iterdir())
    others = [p.name for p in present if not (p.is_file() and _HF_FOLDER_FILES.fullmatch(p.name))]
    if others:
        raise FileExistsError(f"{out_dir} holds files that are not a transformers model's ({', '.join(others[:5])}"
                              f"{', ...' if len(others) > 5 else ''}); export to a new or empty folder")
    if present and not overwrite:
        raise FileExistsError(f"{out_dir} holds an earlier export ({', '.join(p.name for p in present[:5])}"
                              f"{', ...' if len(present) > 5 else ''}); pass overwrite=True (mygpt export "
                              f"--overwrite) to replace it")
    # config.json first: a folder left half emptied by a crash is then no model that transformers would load
    for path in sorted(present, key=lambda p: p.name != "config.json"):
        path.unlink()


def _write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- Hugging Face transformers

def export_hf(model, out_dir, tokenizer="gpt2", overwrite=False):
    """Write model (and its tokenizer) as a transformers directory of its architecture (export_architecture:
    GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM); returns out_dir as a Path.

    Files: config.json, model.safetensors and, unless tokenizer=None, vocab.json, merges.txt and
    tokenizer_config.json; the folder holds nothing else (see _empty_export_folder: an earlier export is replaced
    only with overwrite=True, a folder with other files is refused). tokenizer is anything
    mygpt.tokenizer.describe_tokenizer accepts ("gpt2", an Encoder, a checkpoint's tokenizer record). A tied head is
    left out (transformers ties it again); an untied one is written with tie_word_embeddings=false.
    """
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("export_hf needs safetensors: pip install 'mygpt[export]' (or pip install safetensors)") from e
    architecture = export_architecture(model, "Hugging Face transformers")
    c = model.config
    encoder = _gpt2_encoder(tokenizer, c.vocab_size, "Hugging Face transformers")
    eot = None if encoder is None else encoder.special_tokens.get(ENDOFTEXT)
    out_dir = Path(out_dir)
    _empty_export_folder(out_dir, overwrite)

    if architecture == "GPT-2":
        tensors, config = _gpt2_hf_tensors(model), _gpt2_hf_config(model)
    else:
        tensors, config = export_llama.hf_tensors(model, architecture), export_llama.hf_config(model, architecture)
    if _is_tied(model):
        del tensors["lm_head.weight"]
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.update(bos_token_id=eot, eos_token_id=eot)
    if encoder is not None:
        _write_hf_tokenizer(out_dir, encoder, c.block_size)
    _write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")  # last: the folder is whole
    return out_dir


def _gpt2_hf_tensors(model):
    """{transformers name: fp32 tensor}: GPT-2's names are mygpt's, its Conv1D weights (in, out)."""
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().float().cpu()
        tensors[name] = (value.t() if name.endswith(CONV1D_WEIGHTS) else value).contiguous()
    return tensors


def _gpt2_hf_config(model):
    """GPT2LMHeadModel's config.json, without the token ids."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new",  # GELU's tanh approximation, as mygpt's
        "resid_pdrop": c.resid_pdrop, "embd_pdrop": c.embd_pdrop, "attn_pdrop": c.attn_pdrop,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": _is_tied(model), "torch_dtype": "float32",
    }


def _write_hf_tokenizer(out_dir, encoder, block_size):
    """vocab.json and merges.txt (what GPT-2's encoder.json and vocab.bpe hold) and tokenizer_config.json."""
    vocab = dict(sorted(encoder.encoder.items(), key=lambda item: item[1]))
    _write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in encoder.merges))
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
              "errors": "replace"}
    if ENDOFTEXT in encoder.special_tokens:
        config.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    _write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- GGUF (llama.cpp)

# mygpt's parameter names -> llama.cpp's for the gpt2 architecture ("N" is the block number)
_GGUF_NAMES = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
}
_GGUF_DTYPES = ("f32", "f16", "q8_0")


def _gguf_name(name):
    """'transformer.h.3.mlp.c_fc.weight' -> 'blk.3.ffn_up.weight'; 'transformer.wte.weight' -> 'token_embd.weight'."""
    module, kind = name.rsplit(".", 1)
    if module.startswith("transformer.h."):
        block, inner = module[len("transformer.h."):].split(".", 1)
        return f"blk.{block}.{_GGUF_NAMES[inner]}.{kind}"
    return f"{_GGUF_NAMES[module]}.{kind}"


def _gguf_tensor(gguf, name, value, dtype):
    """(data, raw_dtype) for one tensor, typed as llama.cpp's converter types it for the file's dtype.

    Vectors (norms, biases) and the position embedding stay f32; matrices become f16 or Q8_0. Q8_0 packs
    rows in blocks of 32, so a matrix whose rows are not a multiple of 32 long falls back to f16.
    """
    array = value.detach().float().cpu().numpy()
    T = gguf.GGMLQuantizationType
    if dtype == "f32" or array.ndim == 1 or name.startswith("position_embd"):
        return array, T.F32
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, T.Q8_0), T.Q8_0
    return array.astype("float16"), T.F16


def export_gguf(model, path, tokenizer="gpt2", dtype="f16"):
    """Write model (and its tokenizer) as a GGUF file of its architecture (export_architecture: llama.cpp's gpt2,
    llama or qwen3); returns path as a Path.

    dtype: "f32", "f16" or "q8_0" for the matrices. The output head is always written as `output.weight`,
    also when tied to the token embedding, so every llama.cpp version finds it. With tokenizer=None (a character
    model, say) the file says tokenizer.ggml.model = "none": llama.cpp loads it and runs on token ids.
    """
    try:
        import gguf
    except ImportError as e:
        raise ImportError("export_gguf needs the gguf package: pip install 'mygpt[export]' (or pip install gguf)") from e
    if dtype not in _GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {_GGUF_DTYPES}, got {dtype!r}")
    architecture = export_architecture(model, "GGUF")
    c = model.config
    encoder = _gpt2_encoder(tokenizer, c.vocab_size, "GGUF")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), export_llama.GGUF_ARCHITECTURES.get(architecture, "gpt2"))
        writer.add_name("mygpt")
        writer.add_block_count(c.n_layer)
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(model.transformer.h[0].mlp.c_proj.in_features)
        writer.add_head_count(c.n_head)
        if architecture == "GPT-2":
            writer.add_layer_norm_eps(1e-5)
            tensors = ((_gguf_name(name), value) for name, value in model.state_dict().items())
        else:
            export_llama.add_gguf_metadata(writer, model)
            tensors = export_llama.gguf_tensors(model, architecture)
        writer.add_file_type(file_type)
        writer.add_vocab_size(c.vocab_size)  # what llama.cpp reads for a model without a token list
        if encoder is not None:
            _add_gguf_tokenizer(gguf, writer, encoder, c.vocab_size)
        else:  # llama.cpp refuses a file without this key; "none" loads the weights to run on token ids
            writer.add_tokenizer_model("none")
        for name, value in tensors:
            data, raw_dtype = _gguf_tensor(gguf, name, value, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_gguf_tokenizer(gguf, writer, encoder, vocab_size):
    """GPT-2's BPE as llama.cpp's converter writes it: tokens in id order (ids the vocabulary lacks up to
    vocab_size as [PAD<id>]), their types, the merges, and <|endoftext|> as bos, eos and unk."""
    by_id = {i: token for token, i in encoder.encoder.items()}
    special = set(encoder.special_tokens.values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in encoder.merges])
    eot = encoder.special_tokens.get(ENDOFTEXT)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
        writer.add_unk_token_id(eot)
