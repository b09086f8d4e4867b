"""
Causal time-weighted attention as one fused Triton kernel: FlashAttention-2 with weights after the softmax.

    y = softmax(q k^T / sqrt(d) + causal mask) * W @ v        q, k, v: (B, n_head, T, head_size)

W is never materialised per batch, and for 'circulant' not even per head: each tile of W is read from
the (n_head, block_size, block_size) 'full' parameter, or computed from the tile's indices as
time_weight[h, block_size - 1 - (t - u)] * time_bias[h, 0, u]. Memory is O(T) per (batch, head).

Forward, per tile of queries, over tiles of keys (online softmax): with s = q k^T / sqrt(d),

    m_new = max(m, rowmax(s))        l = l * exp(m - m_new) + rowsum(exp(s - m_new))
    acc = acc * exp(m - m_new) + (exp(s - m_new) * W) @ v        and at the end    o = acc / l

The denominator l sums the plain probabilities: W acts after normalisation. The log-sum-exp m + log l
of each row is kept for the backward pass, which recomputes P = exp(s - lse) tile by tile. With
A = P * W and O = A V:

    dV = A^T dO      dA = dO V^T      dW = sum over batch of P * dA      dP = W * dA
    dS = P * (dP - rowsum(dP * P)) = P * (W * dA - D)      D = rowsum(dO * O)

since rowsum(W * dA * P) = rowsum(dA * A) = rowsum(dO * O): FlashAttention's D is unchanged.
dQ = dS K / sqrt(d) and dK = dS^T Q / sqrt(d). Three backward kernels: dK, dV (a program per key tile),
dQ (a program per query tile), and dW (a program per (query tile, key tile, head) looping over the
batch, so the batch sum stays in registers). For 'circulant', dW is reduced in that kernel: by
column into time_bias and along diagonals into time_weight (the only atomics, a few per tile).

Exponentials are base 2 (exp2 is one instruction): scores are scaled by log2(e) / sqrt(d) up front.
Importing this module needs Triton; with TRITON_INTERPRET=1 set before the import, the kernels run
on CPU tensors in Triton's interpreter (slowly: for tests).
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# The MODE of the kernels, which W: all ones, full or circulant (constexpr, so that kernels can read them)
_NONE, _FULL, _CIRCULANT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _time_weights(W1, W2, h, t, u, valid, s_w1h, s_w1t, s_w2h, block_size, MODE: tl.constexpr):
    """The fp32 tile W[h, t, u] (broadcast of t and u), 0 where not valid."""
    if MODE == _FULL:
        w = tl.load(W1 + h * s_w1h + t * s_w1t + u, mask=valid, other=0.0).to(tl.float32)
    elif MODE == _CIRCULANT:
        by_distance = tl.load(W1 + h * s_w1h + (block_size - 1 - (t - u)), mask=valid, other=0.0)
        by_key = tl.load(W2 + h * s_w2h + u, mask=valid, other=0.0)
        w = by_distance.to(tl.float32) * by_key.to(tl.float32)
    else:
        w = valid.to(tl.float32)
    return w


@triton.jit
def _forward(Q, K, V, W1, W2, O, LSE,
             s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
             s_w1h, s_w1t, s_w2h, n_head, T, block_size, qk_scale,
             HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             MODE: tl.constexpr, PRECISION: tl.constexpr):
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = tl.cast(bh // n_head, tl.int64), bh % n_head  # 64-bit offsets: B * T * 3C may pass 2**31
    t = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions of this program
    d = tl.arange(0, HEAD_PAD)  # channels, padded to a power of 2
    q = tl.load(Q + b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :],
                mask=(t[:, None] < T) & (d[None, :] < HEAD), other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores (log2 units)
    l = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator sum exp2(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)  # running numerator (exp2(s - m) * W) @ v
    for start in range(0, tl.minimum((m_block + 1) * BLOCK_M, T), BLOCK_N):  # causal: keys up to the last query
        u = start + tl.arange(0, BLOCK_N)  # key positions
        kv_mask = (u[:, None] < T) & (d[None, :] < HEAD)
        k = tl.load(K + b * s_kb + h * s_kh + u[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + u[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0)
        valid = (u[None, :] <= t[:, None]) & (u[None, :] < T)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: key 0 is valid for every row
        rescale = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * rescale + tl.sum(p, 1)
        # rows past T are computed (without NaNs) but not stored; their W would lie outside the parameters
        w = _time_weights(W1, W2, h, t[:, None], u[None, :], valid & (t[:, None] < T), s_w1h, s_w1t, s_w2h,
                          block_size, MODE)
        acc = acc * rescale[:, None] + tl.dot((p * w).to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    o = acc / l[:, None]
    tl.store(O + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], o.to(O.dtype.element_ty),
             mask=(t[:, None] < T) & (d[None, :] < HEAD))
    tl.store(LSE + bh * T + t, m + tl.log2(l), mask=t < T)


@triton.jit
def _backward_dk_dv(Q, K, V, W1, W2, DO, LSE, DELTA, DK, DV,
                    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_gb, s_gh, s_gt,
                    s_w1h, s_w1t, s_w2h, n_head, T, block_size, qk_scale, sm_scale,
                    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MODE: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of one tile of keys, over the query tiles at or after it. Tiles are transposed: (keys, queries)."""
    n_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = tl.cast(bh // n_head, tl.int64), bh % n_head
    u = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_PAD)
    kv_mask = (u[:, None] < T) & (d[None, :] < HEAD)
    k = tl.load(K + b * s_kb + h * s_kh + u[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + u[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
    for start in range((n_block * BLOCK_N // BLOCK_M) * BLOCK_M, T, BLOCK_M):
        t = start + tl.arange(0, BLOCK_M)
        q_mask = (t[:, None] < T) & (d[None, :] < HEAD)
        q = tl.load(Q + b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * T + t, mask=t < T, other=0.0)
        delta = tl.load(DELTA + bh * T + t, mask=t < T, other=0.0)
        valid = (u[:, None] <= t[None, :]) & (t[None, :] < T) & (u[:, None] < T)
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p = tl.where(valid, tl.exp2(s - lse[None, :]), 0.0)
        w = _time_weights(W1, W2, h, t[None, :], u[:, None], valid, s_w1h, s_w1t, s_w2h, block_size, MODE)
        dv += tl.dot((p * w).to(do.dtype), do, input_precision=PRECISION)  # A^T dO
        da = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
        ds = p * (w * da - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)  # dS^T Q
    g = b * s_gb + h * s_gh + u[:, None] * s_gt + d[None, :]  # dK, dV and dQ share one layout
    tl.store(DK + g, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _backward_dq(Q, K, V, W1, W2, DO, LSE, DELTA, DQ,
                 s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_gb, s_gh, s_gt,
                 s_w1h, s_w1t, s_w2h, n_head, T, block_size, qk_scale, sm_scale,
                 HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 MODE: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one tile of queries, over the key tiles up to it."""
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = tl.cast(bh // n_head, tl.int64), bh % n_head
    t = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_PAD)
    q_mask = (t[:, None] < T) & (d[None, :] < HEAD)
    q = tl.load(Q + b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * T + t, mask=t < T, other=0.0)
    delta = tl.load(DELTA + bh * T + t, mask=t < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for start in range(0, tl.minimum((m_block + 1) * BLOCK_M, T), BLOCK_N):
        u = start + tl.arange(0, BLOCK_N)
        kv_mask = (u[:, None] < T) & (d[None, :] < HEAD)
        k = tl.load(K + b * s_kb + h * s_kh + u[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + u[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0)
        valid = (u[None, :] <= t[:, None]) & (u[None, :] < T) & (t[:, None] < T)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        w = _time_weights(W1, W2, h, t[:, None], u[None, :], valid, s_w1h, s_w1t, s_w2h, block_size, MODE)
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (w * da - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + b * s_gb + h * s_gh + t[:, None] * s_gt + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _backward_dw(Q, K, V, W1, W2, DO, LSE, DW1, DW2,
                 s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                 s_w1h, s_w1t, s_w2h, batch, T, block_size, qk_scale,
                 HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DIAG: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr):
    """G = sum over the batch of P * dA on one (query tile, key tile) of one head, then the time parameters' share."""
    m_block, n_block, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if n_block * BLOCK_N > m_block * BLOCK_M + BLOCK_M - 1:
        return  # the tile lies above the diagonal
    n_head = tl.num_programs(2)
    t = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    u = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_PAD)
    q_mask = (t[:, None] < T) & (d[None, :] < HEAD)
    kv_mask = (u[:, None] < T) & (d[None, :] < HEAD)
    valid = (u[None, :] <= t[:, None]) & (u[None, :] < T) & (t[:, None] < T)
    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(batch):
        b64 = tl.cast(b, tl.int64)  # 64-bit offsets
        q = tl.load(Q + b64 * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b64 * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], mask=q_mask, other=0.0)
        k = tl.load(K + b64 * s_kb + h * s_kh + u[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b64 * s_vb + h * s_vh + u[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0)
        lse = tl.load(LSE + (b * n_head + h) * T + t, mask=t < T, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        g += p * tl.dot(do, tl.trans(v), input_precision=PRECISION)  # P * dA
    if MODE == _FULL:
        tl.store(DW1 + h * block_size * block_size + t[:, None] * block_size + u[None, :], g, mask=valid)
    else:  # _CIRCULANT: W[t, u] = time_weight[block_size - 1 - (t - u)] * time_bias[u]
        by_distance = tl.load(W1 + h * s_w1h + (block_size - 1 - (t[:, None] - u[None, :])), mask=valid, other=0.0)
        by_key = tl.load(W2 + h * s_w2h + u, mask=u < T, other=0.0)
        # d time_bias[u] = sum over t of G * time_weight[...]: a column sum
        tl.atomic_add(DW2 + h * block_size + u, tl.sum(g * by_distance.to(tl.float32), 0), mask=u < T)
        # d time_weight[block_size - 1 - (t - u)] = sum of G * time_bias[u] along each diagonal. Diagonal c of
        # the tile (c = i - j + BLOCK_N - 1 for row i, column j) meets row i at column j = i + BLOCK_N - 1 - c:
        # gathering that column for every (i, c) turns diagonals into columns, then sum the rows.
        x = g * by_key.to(tl.float32)[None, :]
        c = tl.arange(0, BLOCK_DIAG)
        column = tl.arange(0, BLOCK_M)[:, None] + BLOCK_N - 1 - c[None, :]  # (BLOCK_M, BLOCK_DIAG)
        inside = (column >= 0) & (column < BLOCK_N)
        by_diagonal = tl.sum(tl.where(inside, tl.gather(x, tl.where(inside, column, 0), 1), 0.0), 0)
        distance = m_block * BLOCK_M - n_block * BLOCK_N + c - (BLOCK_N - 1)  # t - u on diagonal c
        tl.atomic_add(DW1 + h * block_size + (block_size - 1 - distance), by_diagonal,
                      mask=(c < BLOCK_M + BLOCK_N - 1) & (distance >= 0) & (distance < T))


def _tiles(dtype, head_size, device_type, backward):
    """(BLOCK_M, BLOCK_N, num_warps) of the forward or the backward launches for such inputs.

    The interpreter (CPU) is fastest with small tiles. On a GPU, 16-bit inputs take FlashAttention-2's
    64 x 64 tiles and fp32 ones 32 x 32 (whose shared memory then stays within a GPU's ~100-227 KB).
    The backward kernels and wide heads hold more per tile: with 4 warps ptxas spills their registers
    (bf16, head size 64, sm_90), with 8 it does not.
    """
    if device_type == "cpu":
        return 16, 16, 1
    tile = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return tile, tile, 8 if backward or head_size > 64 else 4


def _launch_args(q, w1, w2, mode, backward):
    """Keyword arguments of the forward or the backward launches: tiles, padded head size, weight strides..."""
    hs = q.shape[-1]
    BLOCK_M, BLOCK_N, num_warps = _tiles(q.dtype, hs, q.device.type, backward)
    # fp32 inputs follow torch's TF32 switch, so that both paths round alike; 16-bit inputs ignore it
    precision = "tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    s_w1h = w1.stride(0) if mode != _NONE else 0
    s_w1t = w1.stride(1) if mode == _FULL else 0
    s_w2h = w2.stride(0) if mode == _CIRCULANT else 0
    block_size = w1.shape[1] if mode != _NONE else 1
    return dict(s_w1h=s_w1h, s_w1t=s_w1t, s_w2h=s_w2h, block_size=block_size, HEAD=hs,
                HEAD_PAD=max(16, triton.next_power_of_2(hs)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MODE=mode,
                PRECISION=precision, num_warps=num_warps, num_stages=2)


def _pointers(q, w1, w2):
    """The time parameters as kernel pointers: an unused one (an empty tensor) points at q instead."""
    return (w1 if w1.numel() else q), (w2 if w2.numel() else q)


def _strides(*tensors):
    """(batch, head, time) strides of (B, nh, T, hs) tensors whose channels are contiguous."""
    return [s for x in tensors for s in x.stride()[:3]]


def _empty_bthd(q):
    """An uninitialised tensor shaped like q (B, nh, T, hs) but laid out as (B, T, nh, hs), which is
    how the model reassembles heads: its transpose back to (B, T, C) is then free."""
    B, nh, T, hs = q.shape
    return q.new_empty(B, T, nh, hs).transpose(1, 2)


@torch.library.custom_op("mygpt::time_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, nh, T, hs = q.shape
    o = _empty_bthd(q)
    lse = q.new_empty(B, nh, T, dtype=torch.float32)  # log2-sum-exp2 of each row of scores
    args = _launch_args(q, w1, w2, mode, backward=False)
    _forward[(triton.cdiv(T, args["BLOCK_M"]), B * nh)](
        q, k, v, *_pointers(q, w1, w2), o, lse, *_strides(q, k, v, o), n_head=nh, T=T,
        qk_scale=math.log2(math.e) / math.sqrt(hs), **args)
    return o, lse


@_forward_op.register_fake
def _(q, k, v, w1, w2, mode):
    B, nh, T, hs = q.shape
    return _empty_bthd(q), q.new_empty(B, nh, T, dtype=torch.float32)


@torch.library.custom_op("mygpt::time_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 mode: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, nh, T, hs = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # D = rowsum(dO * O), (B, nh, T)
    dq, dk, dv = _empty_bthd(q), _empty_bthd(k), _empty_bthd(v)
    args = _launch_args(q, w1, w2, mode, backward=True)
    sm_scale = 1.0 / math.sqrt(hs)
    qk_scale = math.log2(math.e) * sm_scale
    W1, W2 = _pointers(q, w1, w2)
    strides = _strides(q, k, v, do, dq)
    _backward_dk_dv[(triton.cdiv(T, args["BLOCK_N"]), B * nh)](
        q, k, v, W1, W2, do, lse, delta, dk, dv, *strides, n_head=nh, T=T, qk_scale=qk_scale, sm_scale=sm_scale,
        **args)
    _backward_dq[(triton.cdiv(T, args["BLOCK_M"]), B * nh)](
        q, k, v, W1, W2, do, lse, delta, dq, *strides, n_head=nh, T=T, qk_scale=qk_scale, sm_scale=sm_scale, **args)
    # the time parameters' gradients are summed over the batch in fp32, then take the parameters' dtype
    dw1 = torch.zeros(w1.shape, device=q.device, dtype=torch.float32)
    dw2 = torch.zeros(w2.shape, device=q.device, dtype=torch.float32)
    if mode != _NONE:
        _backward_dw[(triton.cdiv(T, args["BLOCK_M"]), triton.cdiv(T, args["BLOCK_N"]), nh)](
            q, k, v, W1, W2, do, lse, dw1, dw2, *strides[:12], batch=B, T=T, qk_scale=qk_scale,
            BLOCK_DIAG=triton.next_power_of_2(args["BLOCK_M"] + args["BLOCK_N"] - 1), **args)
    return dq, dk, dv, dw1.to(w1.dtype), dw2.to(w2.dtype)


@_backward_op.register_fake
def _(do, q, k, v, w1, w2, o, lse, mode):
    return _empty_bthd(q), _empty_bthd(k), _empty_bthd(v), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    q, k, v, w1, w2, mode = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, w1, w2, o, lse)
    ctx.mode = mode


def _backward(ctx, do, dlse):
    dq, dk, dv, dw1, dw2 = _backward_op(do, *ctx.saved_tensors, ctx.mode)
    return dq, dk, dv, dw1, dw2, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def time_weighted_attention(q, k, v, time_weighting=None, time_weight=None, time_bias=None):
    """softmax(q k^T / sqrt(d) + causal mask) * W @ v for q, k, v (B, n_head, T, head_size); see mygpt.kernels."""
    q, k, v, w1, w2, mode = _check(q, k, v, time_weighting, time_weight, time_bias)
    return _forward_op(q, k, v, w1, w2, mode)[0]


def _check(q, k, v, time_weighting, time_weight, time_bias):
    """(q, k, v, w1, w2, mode) as the kernels take them, or a clear error for inputs they cannot take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape != q.shape:
            raise ValueError(f"q, k and v must share one shape (batch, n_head, T, head_size); "
                             f"got q {tuple(q.shape)}, {name} {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype of float32, float16, bfloat16; "
                            f"got q {q.dtype}, {name} {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"q, k and v must be on one device; got q on {q.device}, {name} on {x.device}")
    if q.device.type == "cpu" and not isinstance(_forward, InterpretedFunction):
        raise RuntimeError("the Triton kernel got CPU tensors: set TRITON_INTERPRET=1 (before mygpt.kernels is first "
                           "used) to run the kernel on the CPU (slow, for tests), or use the PyTorch path "
                           "(attention='torch')")
    if q.dtype == torch.bfloat16 and isinstance(_forward, InterpretedFunction):
        # numpy has no bfloat16: the interpreter keeps its bit patterns as integers and multiplies those in tl.dot
        raise TypeError("Triton's interpreter computes bfloat16 matrix products wrongly; on the CPU give the kernel "
                        "float32 or float16 tensors")
    B, nh, T, hs = q.shape
    if hs > 256:
        raise ValueError(f"head_size {hs} is larger than the kernel's limit of 256")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # contiguous channels
    none = q.new_empty(0)
    if time_weighting is not None:
        if time_weight is not None or time_bias is not None:
            raise ValueError("give either time_weighting ('full') or time_weight and time_bias ('circulant'), not both")
        w = time_weighting
        if w.dim() != 3 or w.shape[0] != nh or w.shape[1] != w.shape[2] or w.shape[1] < T:
            raise ValueError(f"time_weighting must have shape (n_head={nh}, block_size, block_size) with "
                             f"block_size >= T={T}; got {tuple(w.shape)}")
        return q, k, v, _on(w, q).contiguous(), none, _FULL.value
    if (time_weight is None) != (time_bias is None):
        raise ValueError("the circulant form needs both time_weight and time_bias")
    if time_weight is None:
        return q, k, v, none, none, _NONE.value
    block_size = time_weight.shape[-1]
    if time_weight.shape != (nh, block_size) or time_bias.shape != (nh, 1, block_size) or block_size < T:
        raise ValueError(f"time_weight must have shape (n_head={nh}, block_size) and time_bias (n_head, 1, "
                         f"block_size) with block_size >= T={T}; got {tuple(time_weight.shape)} and "
                         f"{tuple(time_bias.shape)}")
    return q, k, v, _on(time_weight, q).contiguous(), _on(time_bias, q).reshape(nh, block_size).contiguous(), _CIRCULANT.value


def _on(w, q):
    if w.device != q.device:
        raise ValueError(f"the time parameters must be on the device of q ({q.device}), got {w.device}")
    return w
