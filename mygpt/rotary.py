"""
Rotary position embedding (RoPE; Su et al. 2021, "RoFormer"): positions enter attention by rotating
queries and keys, so that q_t · k_u depends on the positions only through t - u.

A head's hs channels form hs/2 pairs (x1[j], x2[j]) = (x[j], x[j + hs/2]) (the half-split layout of
GPT-NeoX and Hugging Face's Llama). Read each pair as the complex number x1 + i x2; at position t it is
multiplied by e^{i t θ_j}, a rotation by the angle t θ_j, with one frequency per pair:

    θ_j = base^(-2j / hs),   j = 0 .. hs/2 - 1
    rope(x, t) = (x1 + i x2) · e^{i t θ_j}    i.e.   x1' = x1 cos(tθ_j) - x2 sin(tθ_j)
                                                      x2' = x1 sin(tθ_j) + x2 cos(tθ_j)

Rotations preserve dot products up to the angle between them, so (R_t q) · (R_u k) = q · R_{u-t} k.
The angles are computed in fp32 from absolute positions at every call (a few hundred numbers per layer):
a cached key was rotated at its own position once, and a new query at position `start` meets it exactly
as it would in the whole sequence.
"""

import torch


def rotary_angles(head_size, positions, base):
    """cos and sin of t θ_j, each (T, hs/2), for positions (T,) of integers."""
    j = torch.arange(0, head_size // 2, device=positions.device, dtype=torch.float32)
    theta = base ** (-2.0 * j / head_size)                   # (hs/2,)
    angles = positions.float()[:, None] * theta[None, :]     # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x (B, nh, T, hs) rotated pair by pair: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    dtype = torch.promote_types(x.dtype, torch.float32)     # bf16/fp16 rotate in fp32
    x1, x2 = x.to(dtype).chunk(2, dim=-1)                    # (B, nh, T, hs/2) each
    cos, sin = cos.to(dtype), sin.to(dtype)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)
