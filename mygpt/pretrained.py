"""
Loading OpenAI's GPT-2 weights through Hugging Face transformers (an optional dependency).

GPT-2's original code stores its projections as "Conv1D" modules whose weight is (in, out);
torch's nn.Linear keeps (out, in), so those four weights are transposed on the way in. GPT-2 ties
its output head to the token embedding, and so does the model built here (tie_weights=True), so
fine-tuning keeps one matrix for both.
"""

import os

import torch

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's checkpoints, by their hub names
# weights that GPT-2 keeps as (in_features, out_features)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("GPT.from_pretrained needs Hugging Face transformers: pip install 'mygpt[hf]' "
                          "(or pip install transformers)") from e
    return transformers


def _load_hf_model(name_or_dir):
    transformers = _import_transformers()
    try:
        return transformers.GPT2LMHeadModel.from_pretrained(name_or_dir)
    except OSError as e:
        where = "directory" if os.path.isdir(name_or_dir) else "model name"
        raise OSError(f"could not load GPT-2 weights from {where} {name_or_dir!r}. Offline, save the model once "
                      f"with GPT2LMHeadModel.from_pretrained(...).save_pretrained(DIR) on a machine with network "
                      f"access and pass DIR here. ({e})") from e


def load_gpt2(gpt_class, name_or_dir, **overrides):
    """A gpt_class model holding the weights of the GPT-2 named (hub name) or saved (directory) as name_or_dir.

    overrides set config fields that do not change the weights' shapes (e.g. dropout). The model comes back
    in eval mode, as from transformers; call .train() to fine-tune it.
    """
    hf_model = _load_hf_model(name_or_dir)
    hf_config = hf_model.config
    config = gpt_class.get_default_config()
    config.n_layer, config.n_head, config.n_embd = hf_config.n_layer, hf_config.n_head, hf_config.n_embd
    config.vocab_size, config.block_size = hf_config.vocab_size, hf_config.n_positions
    config.tie_weights = bool(getattr(hf_config, "tie_word_embeddings", True))
    config.merge_from_dict(overrides)
    if (config.time_weighting is not None or config.token_shift or config.pos_emb not in (True, "learned")
            or config.norm != "layernorm" or config.embd_norm or config.qk_norm or config.mlp != "gelu"
            or config.mlp_hidden is not None or config.n_kv_head not in (None, config.n_head)
            or config.logit_softcap is not None or config.zero_init):
        raise ValueError("GPT-2 weights need the vanilla architecture: time_weighting=None, token_shift=False, "
                         "pos_emb='learned', norm='layernorm', embd_norm=False, qk_norm=False, mlp='gelu', "
                         "mlp_hidden=None, n_kv_head=None, logit_softcap=None, zero_init=False")
    model = gpt_class(config)
    _copy_gpt2_weights(hf_model.state_dict(), model)
    return model.eval()  # as transformers returns it: no dropout until the caller asks for training


@torch.no_grad()
def _copy_gpt2_weights(hf_state, model):
    """Copy a transformers GPT2LMHeadModel state dict into model, checking that every weight is used."""
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    hf_state.setdefault("lm_head.weight", hf_state["transformer.wte.weight"])
    missing = sorted(set(ours) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"GPT-2 checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    for name, value in hf_state.items():
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        if value.shape != ours[name].shape:
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(value.shape)}, "
                             f"model {tuple(ours[name].shape)}")
        ours[name].copy_(value)
