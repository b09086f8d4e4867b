// One decoding step of a GPT-2-architecture model in one call: mygpt.model.GPT.forward's arithmetic for one new
// token of one sequence with a KVCache, every layer in C++ (mygpt/decode.py says when a model qualifies and lays
// out the table below). The token (and position) embeddings, then per block x += proj(attention(LayerNorm(x))) and
// x += proj2(gelu_tanh(fc(LayerNorm(x)))), then the final LayerNorm and the head; with the seed's time weighting
// (each attention probability times a learned weight, 'full' or 'circulant') and token shift where configured.
// The products are matvec.cpp's (built into the same library), so each Linear multiplies exactly as its one-row
// forward does (fp32, bf16 with x rounded to bf16, int8 with x in fp32 or in q8_0 blocks); norms, attention and
// GELU are computed in fp32 as PyTorch computes them there, in another order of additions.
//
// Why C++: in Python, the ~25 operations of a block cost ~140 µs a token of dispatch, a fifth of GPT-2 124M's
// int8 step on one thread, while the products themselves run at memory's speed.
//
// table (int64 addresses, 0 for none): wte, wpe, ln_f (weight, bias), lm_head (LIN); then per layer ln_1 (2),
// c_attn (LIN), attn.c_proj (LIN), ln_2 (2), c_fc (LIN), mlp.c_proj (LIN), keys, values, the time weights (full:
// time_weighting (n_head, T, T) and 0; circulant: time_weight (n_head, T), time_bias (n_head, 1, T)), the
// attention input of the position before (token shift; (1, 1, C), overwritten with this one's). LIN is weight,
// scale, bias, matvec's kind. keys and values are the layer's KVCache tensors, (1, n_head, T, head_size) fp32,
// T = block_size.

#include <cmath>

constexpr int64_t HEADER = 8, PER_LAYER = 25;
enum TimeWeighting { NONE = 0, FULL = 1, CIRCULANT = 2 };
constexpr float LN_EPS = 1e-5f;  // nn.LayerNorm's, as mygpt.model makes them

static void linear(const int64_t* lin, const float* x, float* y, int64_t n_out, int64_t n_in, int64_t threads) {
    matvec((const void*)lin[0], x, (const float*)lin[1], (const float*)lin[2], y, lin[3], n_out, n_in, threads);
}

// (x - mean) / sqrt(var + eps) * weight + bias over n values (weight, bias may be null)
static void layer_norm(const float* x, const int64_t* norm, float* out, int64_t n) {
    const float *weight = (const float*)norm[0], *bias = (const float*)norm[1];
    float mean = 0, var = 0;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= n;
    for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / std::sqrt(var / n + LN_EPS);
    for (int64_t i = 0; i < n; ++i) {
        float v = (x[i] - mean) * rstd;
        out[i] = (weight ? v * weight[i] : v) + (bias ? bias[i] : 0.0f);
    }
}

// GPT-2's GELU, the tanh approximation (mygpt.model._gelu in fp32), in place over n values: a vector at a time with
// ATen's vectorized tanh, as PyTorch's own kernel computes it (one tanhf at a time cost ~1 ms of GPT-2's step)
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));  // sqrt(2 / pi)
}

static void gelu(float* h, int64_t n) {
    int64_t i = 0;
#if INDUCTOR_USE_VECTOR_TYPES()
    using V = at::vec::Vectorized<float>;
    const V k(0.7978845608028654f), c(0.044715f), half(0.5f), one(1.0f);
    for (; i + V::size() <= n; i += V::size()) {
        V x = V::loadu(h + i);
        (half * x * (one + (k * (x + c * x * x * x)).tanh())).store(h + i);
    }
#endif
    for (; i < n; ++i) h[i] = gelu_tanh(h[i]);
}

// p[j] = exp(p[j] - top) over n values, and their sum (vectorized as gelu is)
static float exp_shifted(float* p, int64_t n, float top) {
    int64_t j = 0;
    float total = 0;
#if INDUCTOR_USE_VECTOR_TYPES()
    using V = at::vec::Vectorized<float>;
    V sums(0.0f);
    for (; j + V::size() <= n; j += V::size()) {
        V e = (V::loadu(p + j) - V(top)).exp();
        e.store(p + j);
        sums = sums + e;
    }
    total = at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, sums);
#endif
    for (; j < n; ++j) total += p[j] = std::exp(p[j] - top);
    return total;
}

// softmax(q k_j / sqrt(hs), j = 0..t) [times the time weight W[h, t, j]] weighting v_j, for each head;
// q (C), keys and values (n_head, T, hs); tw, tb: the layer's time weights (see the table above)
static void attend(const float* q, const float* keys, const float* values, float* y, int64_t t, int64_t n_head,
                   int64_t hs, int64_t T, int64_t time_weighting, const float* tw, const float* tb, int64_t threads) {
    const float scale = 1.0f / std::sqrt(float(hs));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t h = 0; h < n_head; ++h) {
        std::vector<float> p(t + 1);
        const float *qh = q + h * hs, *kh = keys + h * T * hs, *vh = values + h * T * hs;
        float top = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
            p[j] = dot(kh + j * hs, qh, hs) * scale;
            top = std::max(top, p[j]);
        }
        float total = exp_shifted(p.data(), t + 1, top);
        float* yh = y + h * hs;
        std::fill(yh, yh + hs, 0.0f);
        for (int64_t j = 0; j <= t; ++j) {
            float w = p[j] / total;
            if (time_weighting == FULL)
                w *= tw[(h * T + t) * T + j];
            else if (time_weighting == CIRCULANT)  // by distance t - j, times a weight per key position
                w *= tw[h * T + T - 1 - (t - j)] * tb[h * T + j];
            for (int64_t d = 0; d < hs; ++d) yh[d] += w * vh[j * hs + d];
        }
    }
}

extern "C" void kernel(const int64_t* table, float* logits, int64_t token, int64_t t, int64_t n_layer,
                       int64_t n_head, int64_t C, int64_t hidden, int64_t vocab, int64_t T, int64_t time_weighting,
                       int64_t token_shift, int64_t threads) {
    const int64_t hs = C / n_head;
    std::vector<float> x(C), xn(C), qkv(3 * C), y(C), out(C), h(hidden);
    const float *wte = (const float*)table[0] + token * C, *wpe = (const float*)table[1];
    for (int64_t i = 0; i < C; ++i) x[i] = wte[i] + (wpe ? wpe[t * C + i] : 0.0f);
    for (int64_t l = 0; l < n_layer; ++l) {
        const int64_t* L = table + HEADER + l * PER_LAYER;
        float *keys = (float*)L[20], *values = (float*)L[21];
        layer_norm(x.data(), L, xn.data(), C);
        if (token_shift) {  // the first half of the channels from the position before; remember this one's
            float* previous = (float*)L[24];
            for (int64_t i = 0; i < C / 2; ++i) std::swap(xn[i], previous[i]);
            std::copy(xn.begin() + C / 2, xn.end(), previous + C / 2);
        }
        linear(L + 2, xn.data(), qkv.data(), 3 * C, C, threads);
        for (int64_t hd = 0; hd < n_head; ++hd) {  // this position's key and value into the cache
            std::copy_n(qkv.data() + C + hd * hs, hs, keys + (hd * T + t) * hs);
            std::copy_n(qkv.data() + 2 * C + hd * hs, hs, values + (hd * T + t) * hs);
        }
        attend(qkv.data(), keys, values, y.data(), t, n_head, hs, T, time_weighting, (const float*)L[22],
               (const float*)L[23], threads);
        linear(L + 6, y.data(), out.data(), C, C, threads);
        for (int64_t i = 0; i < C; ++i) x[i] += out[i];
        layer_norm(x.data(), L + 10, xn.data(), C);
        linear(L + 12, xn.data(), h.data(), hidden, C, threads);
        gelu(h.data(), hidden);
        linear(L + 16, h.data(), out.data(), C, hidden, threads);
        for (int64_t i = 0; i < C; ++i) x[i] += out[i];
    }
    layer_norm(x.data(), table + 2, xn.data(), C);
    linear(table + 4, xn.data(), logits, vocab, C, threads);
}
