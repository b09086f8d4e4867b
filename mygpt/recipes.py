"""
Named recipes: documented sets of config overrides, chosen with --model.preset=NAME in every project.

'modern' is today's small-model recipe (nanochat, modded-nanogpt), each piece a switch of mygpt.model or
the Trainer that is off by default:

    model:   rotary positions, parameter-free RMSNorm (also right after the embedding), QK-norm, ReLU² MLP,
             no biases, an untied head, zero-initialised output projections and head, logits capped at ±15
    trainer: Muon for the hidden matrices + AdamW for the rest, warmup-stable-decay schedule

A preset is applied first and the other overrides after it, so --model.preset=modern --model.mlp=swiglu
is the modern recipe with SwiGLU. The model config keeps the preset's name as a record.
"""

_RECIPES = {
    "modern": {
        "model": dict(pos_emb="rope", norm="rmsnorm", embd_norm=True, qk_norm=True, mlp="relu2", bias=False,
                      tie_weights=False, zero_init=True, logit_softcap=15.0),
        "trainer": dict(optimizer="muon", lr_schedule="wsd", lr_decay=True),
    },
}
PRESETS = (None, *_RECIPES)


def apply_recipe(config, name):
    """Set the overrides of recipe `name` in config (a project's root config, with .model and maybe .trainer)."""
    if name not in _RECIPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {[None, *_RECIPES]}")
    config.model.merge_from_dict(_RECIPES[name]["model"])
    config.model.preset = name
    if hasattr(config, "trainer"):
        config.trainer.merge_from_dict(_RECIPES[name]["trainer"])
    return config


def merge_args(config, args, description=None):
    """config.merge_from_args(args), with the recipe of a --model.preset=NAME among them applied first."""
    presets = [a.split("=", 1)[1] for a in args if a.startswith("--model.preset=")]
    if presets and presets[-1] not in ("None", ""):
        apply_recipe(config, presets[-1])
    config.merge_from_args(args, description=description)
    return config
