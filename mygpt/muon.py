"""
Muon for the hidden matrices, AdamW for everything else (Jordan et al. 2024, "Muon: MomentUm Orthogonalized
by Newton-Schulz"; the split of modded-nanogpt and nanochat), as the Trainer's optimizer='muon'.

Muon is PyTorch's own torch.optim.Muon. Per 2-D weight W (out, in) with gradient G, each step:

    B  <- μ B + (1 - μ) G                        momentum (an EMA), μ warmed up from 0.85 to 0.95
    U  =  (1 - μ) G + μ B                        Nesterov
    O  =  NS5(U / ||U||_F)                       five Newton-Schulz steps: ≈ U's orthogonal factor, singular values ≈ 1
    W  <- W (1 - lr λ) - lr sqrt(max(1, out/in)) O

An orthogonalised update moves every direction of a matrix by the same amount, whatever its gradient's
scale; that only makes sense for matrices that map hidden states to hidden states. Embeddings (a lookup
per token), the head (one row per token), gains, biases and time weights keep AdamW.

Learning rates (each group has its own; the Trainer's schedule scales every one of them alike):
  muon_lr = 0.02        Muon's matrices: modded-nanogpt's and nanochat's matrix learning rate
  learning_rate         AdamW's groups, as with optimizer='adamw' (the head decays by weight_decay)
"""

import torch
import torch.nn as nn

# Muon's momentum starts lower while the gradients change fast, then rises (modded-nanogpt: 0.85 -> 0.95
# over its first 300 steps)
_MOMENTUM_START = 0.85
_HEAD_NAMES = ("lm_head", "head")  # the output layer's name in mygpt's GPT and in other models


def _hidden_matrices(model):
    """The 2-D weights of the model's nn.Linear layers other than its head (named lm_head or head, or tied to an
    embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] not in _HEAD_NAMES and id(m.weight) not in embeddings
            and m.weight.dim() == 2 and m.weight.requires_grad]


def configure_muon(model, train_config):
    """MuonAdamW over model's parameters: Muon for _hidden_matrices(model), AdamW for the others."""
    matrices = _hidden_matrices(model)
    if not matrices:
        raise ValueError("optimizer='muon' needs 2-D hidden weight matrices (nn.Linear layers other than the head), "
                         "and this model has none: use optimizer='adamw'")
    C = train_config
    muon_ids = {id(p) for p in matrices}
    decayed = {id(m.weight) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in _HEAD_NAMES}  # the head decays, as with AdamW
    rest = [p for p in model.parameters() if id(p) not in muon_ids and p.requires_grad]
    muon = torch.optim.Muon([{"params": matrices, "peak_lr": C.muon_lr}], lr=C.muon_lr,
                            weight_decay=C.muon_weight_decay, momentum=C.muon_momentum)
    groups = [{"params": [p for p in rest if id(p) in decayed], "weight_decay": C.weight_decay},
              {"params": [p for p in rest if id(p) not in decayed], "weight_decay": 0.0}]
    groups = [dict(g, peak_lr=C.learning_rate) for g in groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    adamw = torch.optim.AdamW(groups, lr=C.learning_rate, betas=C.betas, fused=fused) if groups else None
    return MuonAdamW(muon, adamw)


def muon_momentum(train_config, step):
    """μ for optimizer step `step` (0, 1, ...): linear from _MOMENTUM_START to muon_momentum over
    muon_momentum_warmup steps."""
    C = train_config
    if not C.muon_momentum_warmup:
        return C.muon_momentum
    frac = min(step / C.muon_momentum_warmup, 1.0)
    return (1 - frac) * _MOMENTUM_START + frac * C.muon_momentum


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: the Trainer sees param_groups, step, zero_grad and a state dict."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw
        self.optimizers = [o for o in (muon, adamw) if o is not None]

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def set_momentum(self, momentum):
        for group in self.muon.param_groups:
            group["momentum"] = momentum

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state):
        if not (isinstance(state, dict) and set(state) == {"muon", "adamw"}):
            raise ValueError("this optimizer state is not MuonAdamW's (the checkpoint was written with "
                             "optimizer='adamw'): resume it with optimizer='adamw'")
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])
