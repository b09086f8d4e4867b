"""
Fused GPU kernels. Optional: they need Triton (`pip install "mygpt[gpu]"`), and nothing else in mygpt does.

time_weighted_attention computes causal time-weighted attention in one Triton kernel (forward and
backward) without the (B, n_head, T, T) matrix of probabilities; see mygpt/kernels/time_attention.py.
On CPU tensors it runs only in Triton's interpreter (TRITON_INTERPRET=1 set before first use): slow,
for tests.
"""


def triton_available():
    """True when Triton can be imported (the kernels can run)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def time_weighted_attention(q, k, v, time_weighting=None, time_weight=None, time_bias=None):
    """softmax(q k^T / sqrt(d) + causal mask) * W @ v, fused, differentiable in q, k, v and the time parameters.

    q, k, v: (B, n_head, T, head_size), one of float32, float16, bfloat16 (accumulation is fp32).
    W is 'full' with time_weighting (n_head, block_size, block_size), of which the top-left T x T
    corner is used; 'circulant' with time_weight (n_head, block_size) and time_bias (n_head, 1,
    block_size): W[h, t, u] = time_weight[h, block_size - 1 - (t - u)] * time_bias[h, 0, u]; or all
    ones without either (plain causal attention). No attention dropout. Returns (B, n_head, T, head_size).
    """
    try:
        from mygpt.kernels.time_attention import time_weighted_attention as fused
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "triton":
            raise
        raise ImportError('the fused time-weighted attention kernel needs Triton: pip install "mygpt[gpu]" '
                          '(or pip install triton), or use the PyTorch path (attention="torch")') from e
    return fused(q, k, v, time_weighting, time_weight, time_bias)
