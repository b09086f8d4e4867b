"""
The Llama and Qwen3 tables of mygpt.export: what a mygpt GPT with rotary positions, RMSNorm, SwiGLU and no biases
is in Hugging Face's LlamaForCausalLM / Qwen3ForCausalLM and in llama.cpp's `llama` / `qwen3` architectures.
Qwen3 is Llama with QK-norm: q and k RMS-normalised per head, before the rotation, as mygpt's qk_norm does.

mygpt -> transformers (LlamaForCausalLM; Qwen3ForCausalLM adds the two q/k norms):

    transformer.wte                     model.embed_tokens                      (untied: lm_head too)
    h.N.attn.c_attn rows [q | k | v]    model.layers.N.self_attn.q_proj / k_proj / v_proj
    h.N.attn.c_proj                     model.layers.N.self_attn.o_proj
    h.N.mlp.c_fc rows [gate | value]    model.layers.N.mlp.gate_proj / up_proj
    h.N.mlp.c_proj                      model.layers.N.mlp.down_proj
    (no parameters: RMSNorm)            input_layernorm, post_attention_layernorm, model.norm,
                                        Qwen3's self_attn.q_norm / k_norm: gains of ones

mygpt's RMSNorm has no gain, so each norm is written with a gain of ones: 1 * x is x exactly. Both norms
compute x * rsqrt(mean(x²) + eps) with mygpt's eps (RMS_EPS) as rms_norm_eps. mygpt's rotary pairs channel
j with j + hs/2 (mygpt/rotary.py), as transformers' rotate_half does, so transformers takes q and k as they are.

The GGUF names are those llama.cpp's converter (convert_hf_to_gguf.py) gives the transformers tensors. Its `llama`
architecture rotates adjacent channels (2j, 2j + 1) instead ("NORM" rope), so the converter reorders the rows
of each head of q_proj and k_proj to put channel j beside j + hs/2 (_interleave_rope_rows): q and k come out
permuted alike, and so do their dot products' terms, which leaves the attention scores unchanged. Its
`qwen3` architecture rotates the half-split pairs ("NEOX" rope) and takes the rows as they are.
"""

import torch

from mygpt.model import RMS_EPS

GGUF_ARCHITECTURES = {"Llama": "llama", "Qwen3": "qwen3"}


def _tensors(model, architecture):
    """[(transformers name, GGUF name, fp32 tensor)] of model as `architecture`, the head included."""
    c = model.config
    hs = c.n_embd // c.n_head
    kv = (c.n_kv_head or c.n_head) * hs  # the rows of k and of v
    ones = torch.ones(c.n_embd)
    named = [("model.embed_tokens.weight", "token_embd.weight", model.transformer.wte.weight)]
    for i, block in enumerate(model.transformer.h):
        q, k, v = block.attn.c_attn.weight.split([c.n_embd, kv, kv])        # (C, C), (kv, C), (kv, C)
        gate, up = block.mlp.c_fc.weight.chunk(2)                            # (hidden, C) each
        layer = {  # transformers name under model.layers.i: (GGUF name under blk.i, tensor)
            "input_layernorm": ("attn_norm", ones),
            "self_attn.q_proj": ("attn_q", q), "self_attn.k_proj": ("attn_k", k), "self_attn.v_proj": ("attn_v", v),
            "self_attn.o_proj": ("attn_output", block.attn.c_proj.weight),
            "post_attention_layernorm": ("ffn_norm", ones),
            "mlp.gate_proj": ("ffn_gate", gate), "mlp.up_proj": ("ffn_up", up),
            "mlp.down_proj": ("ffn_down", block.mlp.c_proj.weight),
        }
        if architecture == "Qwen3":
            layer.update({"self_attn.q_norm": ("attn_q_norm", torch.ones(hs)),
                          "self_attn.k_norm": ("attn_k_norm", torch.ones(hs))})
        for name, (gguf_name, value) in layer.items():
            named.append((f"model.layers.{i}.{name}.weight", f"blk.{i}.{gguf_name}.weight", value))
    named += [("model.norm.weight", "output_norm.weight", ones), ("lm_head.weight", "output.weight", model.lm_head.weight)]
    # copies: safetensors refuses tensors that share memory (the norms' ones, the slices of c_attn and c_fc)
    return [(name, gguf_name, value.detach().float().cpu().clone(memory_format=torch.contiguous_format))
            for name, gguf_name, value in named]


def hf_tensors(model, architecture):
    """{transformers name: fp32 tensor} of model as `architecture` ('Llama' or 'Qwen3'), lm_head.weight included."""
    return {name: value for name, _, value in _tensors(model, architecture)}


def hf_config(model, architecture):
    """config.json of model as `architecture`, without the token ids (export.py adds the tokenizer's)."""
    c = model.config
    config = {
        "architectures": [f"{architecture}ForCausalLM"], "model_type": architecture.lower(),
        "vocab_size": c.vocab_size, "max_position_embeddings": c.block_size, "hidden_size": c.n_embd,
        "intermediate_size": model.transformer.h[0].mlp.c_proj.in_features, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head or c.n_head,
        "head_dim": c.n_embd // c.n_head,  # Qwen3Config's default is 128, not hidden_size / heads
        "hidden_act": "silu", "rms_norm_eps": RMS_EPS,
        # transformers 5 reads rope_parameters, 4.x and llama.cpp's converter also rope_theta
        "rope_theta": float(c.rope_base), "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_base)},
        "attention_bias": False, "attention_dropout": c.attn_pdrop, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": c.tie_weights, "torch_dtype": "float32",
    }
    if architecture == "Llama":
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    return config


def _interleave_rope_rows(weight, n_heads):
    """weight (n_heads * hs, C) with each head's rows reordered from (0, 1, .., hs-1) to (0, hs/2, 1, hs/2 + 1, ..):
    the pairs (j, j + hs/2) that transformers rotates become the adjacent pairs that llama.cpp's llama rotates."""
    rows, columns = weight.shape
    hs = rows // n_heads
    return weight.view(n_heads, 2, hs // 2, columns).transpose(1, 2).reshape(rows, columns)


def gguf_tensors(model, architecture):
    """(GGUF name, fp32 tensor) pairs of model as llama.cpp's `architecture`, q and k reordered for llama's rope."""
    c = model.config
    for _, name, value in _tensors(model, architecture):
        if architecture == "Llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            value = _interleave_rope_rows(value, c.n_head if "attn_q" in name else c.n_kv_head or c.n_head)
        yield name, value


def add_gguf_metadata(writer, model):
    """The hyperparameters that llama.cpp's llama and qwen3 read beyond the ones GPT-2 has too."""
    c = model.config
    hs = c.n_embd // c.n_head
    writer.add_head_count_kv(c.n_kv_head or c.n_head)
    writer.add_rope_freq_base(float(c.rope_base))
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(hs)  # every channel of a head is rotated
    writer.add_key_length(hs)
    writer.add_value_length(hs)
