// One decoding step of a mygpt GPT in one call: mygpt.model.GPT.forward's arithmetic for one new token of each of
// `rows` sequences with a KVCache, every layer in C++ (mygpt/decode.py lays out the table and the spec below).
// The token (and position) embeddings [and their norm], then per block x += proj(attention(norm(x))) and
// x += proj2(act(fc(norm(x)))), then the final norm, the head [and the logits' soft cap]. The switches of
// mygpt.model: LayerNorm or parameter-free RMSNorm; GELU (tanh), ReLU² or SwiGLU; learned, rotary or no
// positions; QK-norm; grouped-query attention; the seed's time weighting ('full' or 'circulant': each attention
// probability times a learned weight) and token shift. The products are matvec.cpp's (built into the same
// library), so each Linear multiplies exactly as its one-row forward does (fp32, bf16 with x rounded to bf16,
// int8 with x in fp32 or in q8_0 blocks); the rest is computed in fp32 as PyTorch computes it there, in another
// order of additions.
//
// Why C++: in Python, the ~25 operations of a block cost ~140 µs a token of dispatch, a fifth of GPT-2 124M's
// int8 step on one thread, while the products themselves run at memory's speed.
//
// table (int64 addresses, 0 for none): wte, wpe, ln_f (weight, bias), ln_e (2), lm_head (LIN); then per layer
// ln_1 (2), c_attn (LIN), attn.c_proj (LIN), ln_2 (2), c_fc (LIN), mlp.c_proj (LIN), keys, values, the time
// weights (full: time_weighting (n_head, T, T) and 0; circulant: time_weight (n_head, T), time_bias
// (n_head, 1, T)), the attention input of the position before (token shift; (rows, 1, C), overwritten with this
// one's). LIN is weight, scale, bias, matvec's kind. keys and values are the layer's KVCache tensors,
// (rows, n_kv_head, T, head_size) fp32, T = block_size. spec and reals: see struct Spec. tokens: one per row.

#include <cmath>

constexpr int64_t HEADER = 10, PER_LAYER = 25;
constexpr float RMS_EPS = 1e-6f;  // mygpt.model.RMS_EPS
enum TimeWeighting { NONE = 0, FULL = 1, CIRCULANT = 2 };
enum Mlp { GELU = 0, RELU2 = 1, SWIGLU = 2 };

// the model's shape and switches: spec holds the integers up to embd_norm in this order, reals the two floats
// (0: off)
struct Spec {
    int64_t n_layer, n_head, n_kv_head, C, hidden, vocab, T, time_weighting, token_shift, rmsnorm, mlp, qk_norm,
        embd_norm, threads;
    float rope_base, softcap;
};
constexpr float LN_EPS = 1e-5f;  // nn.LayerNorm's, as mygpt.model makes them

// y (rows, n_out) = x (rows, n_in) times the Linear lin (see the table)
static void linear(const int64_t* lin, const float* x, float* y, int64_t n_out, int64_t n_in, int64_t rows,
                   int64_t threads) {
    matvec((const void*)lin[0], x, (const float*)lin[1], (const float*)lin[2], y, lin[3], n_out, n_in, threads, rows);
}

// x / sqrt(mean(x²) + eps) over n values (mygpt.model's RMSNorm, which has no parameters); out may be x
static void rms_norm(const float* x, float* out, int64_t n) {
    float sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
    float r = 1.0f / std::sqrt(sum / n + RMS_EPS);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r;
}

// the model's norm over n values: RMSNorm, or LayerNorm (x - mean) / sqrt(var + eps) * weight + bias, params
// holding the addresses of weight and bias (either may be null); out may be x
static void norm(const float* x, const int64_t* params, float* out, int64_t n, bool rms) {
    if (rms) return rms_norm(x, out, n);
    const float *weight = (const float*)params[0], *bias = (const float*)params[1];
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

// GPT-2's GELU, the tanh approximation (mygpt.model._gelu in fp32)
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));  // sqrt(2 / pi)
}

// The MLP's activation in place over h: GELU or ReLU² over n values, or SwiGLU silu(gate) * value over the first
// n of h (gate) and the next n (value). A vector at a time with ATen's vectorized tanh and exp, as PyTorch's own
// kernels (one tanhf at a time cost ~1 ms of GPT-2 124M's step)
static void activate(float* h, int64_t n, int64_t kind) {
    int64_t i = 0;
#if INDUCTOR_USE_VECTOR_TYPES()
    using V = at::vec::Vectorized<float>;
    const V k(0.7978845608028654f), c(0.044715f), half(0.5f), one(1.0f), zero(0.0f);
    for (; i + V::size() <= n; i += V::size()) {
        V x = V::loadu(h + i);
        if (kind == GELU)
            x = half * x * (one + (k * (x + c * x * x * x)).tanh());
        else if (kind == RELU2)
            x = at::vec::maximum(x, zero) * at::vec::maximum(x, zero);
        else
            x = x / (one + x.neg().exp()) * V::loadu(h + n + i);
        x.store(h + i);
    }
#endif
    for (; i < n; ++i) {
        float x = h[i];
        h[i] = kind == GELU ? gelu_tanh(x) : kind == RELU2 ? std::max(x, 0.0f) * std::max(x, 0.0f)
                                                           : x / (1.0f + std::exp(-x)) * h[n + i];
    }
}

// logits = cap tanh(logits / cap), vectorized as activate is
static void soft_cap(float* y, int64_t n, float cap) {
    int64_t i = 0;
#if INDUCTOR_USE_VECTOR_TYPES()
    using V = at::vec::Vectorized<float>;
    for (; i + V::size() <= n; i += V::size()) (V(cap) * (V::loadu(y + i) / V(cap)).tanh()).store(y + i);
#endif
    for (; i < n; ++i) y[i] = cap * std::tanh(y[i] / cap);
}

// p[j] = exp(p[j] - top) over n values, and their sum (vectorized as activate is)
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

// rotary positions (mygpt/rotary.py): each pair (x[j], x[j + hs/2]) of each of n heads rotated by t θ_j
static void rotate(float* x, int64_t n, int64_t hs, const float* cos, const float* sin) {
    for (int64_t h = 0; h < n; ++h) {
        float* xh = x + h * hs;
        for (int64_t j = 0; j < hs / 2; ++j) {
            float x1 = xh[j], x2 = xh[j + hs / 2];
            xh[j] = x1 * cos[j] - x2 * sin[j];
            xh[j + hs / 2] = x1 * sin[j] + x2 * cos[j];
        }
    }
}

// softmax(q k_j / sqrt(hs), j = 0..t) [times the time weight W[h, t, j]] weighting v_j, for each query head h,
// whose keys and values are those of head h / (n_head / n_kv_head); q (n_head hs), keys and values
// (n_kv_head, T, hs); tw, tb: the layer's time weights (see the table above)
static void attend(const float* q, const float* keys, const float* values, float* y, int64_t t, const Spec& s,
                   const float* tw, const float* tb) {
    const int64_t hs = s.C / s.n_head, T = s.T, group = s.n_head / s.n_kv_head;
    const float scale = 1.0f / std::sqrt(float(hs));
#pragma omp parallel for num_threads(s.threads) schedule(static) if (s.threads > 1)
    for (int64_t h = 0; h < s.n_head; ++h) {
        std::vector<float> p(t + 1);
        const float *qh = q + h * hs, *kh = keys + h / group * T * hs, *vh = values + h / group * T * hs;
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
            if (s.time_weighting == FULL)
                w *= tw[(h * T + t) * T + j];
            else if (s.time_weighting == CIRCULANT)  // by distance t - j, times a weight per key position
                w *= tw[h * T + T - 1 - (t - j)] * tb[h * T + j];
            for (int64_t d = 0; d < hs; ++d) yh[d] += w * vh[j * hs + d];
        }
    }
}

extern "C" void kernel(const int64_t* table, const int64_t* spec, const float* reals, float* logits,
                       const int64_t* tokens, int64_t rows, int64_t t, int64_t threads) {
    const Spec s{spec[0], spec[1], spec[2], spec[3], spec[4], spec[5], spec[6], spec[7], spec[8], spec[9], spec[10],
                 spec[11], spec[12], threads, reals[0], reals[1]};
    const int64_t C = s.C, hs = C / s.n_head, kv = s.n_kv_head * hs, T = s.T, width = C + 2 * kv;
    const int64_t fc_out = s.mlp == SWIGLU ? 2 * s.hidden : s.hidden;
    // each sequence's row of: the residual stream, its norm, q k v, attention's output, a projection, the MLP
    std::vector<float> x(rows * C), xn(rows * C), qkv(rows * width), y(rows * C), out(rows * C), h(rows * fc_out);
    std::vector<float> cos(hs / 2), sin(hs / 2);
    if (s.rope_base > 0) {  // this position's angles t θ_j, θ_j = base^(-2j / hs), in fp32 as rotary_angles
        for (int64_t j = 0; j < hs / 2; ++j) {
            float angle = float(t) * std::pow(s.rope_base, -2.0f * float(j) / float(hs));
            cos[j] = std::cos(angle);
            sin[j] = std::sin(angle);
        }
    }
    const float* wpe = (const float*)table[1];
    for (int64_t b = 0; b < rows; ++b) {
        const float* wte = (const float*)table[0] + tokens[b] * C;
        for (int64_t i = 0; i < C; ++i) x[b * C + i] = wte[i] + (wpe ? wpe[t * C + i] : 0.0f);
        if (s.embd_norm) norm(&x[b * C], table + 4, &x[b * C], C, s.rmsnorm);
    }
    for (int64_t l = 0; l < s.n_layer; ++l) {
        const int64_t* L = table + HEADER + l * PER_LAYER;
        for (int64_t b = 0; b < rows; ++b) {
            norm(&x[b * C], L, &xn[b * C], C, s.rmsnorm);
            if (s.token_shift) {  // the first half of the channels from the position before; remember this one's
                float *row = &xn[b * C], *previous = (float*)L[24] + b * C;
                for (int64_t i = 0; i < C / 2; ++i) std::swap(row[i], previous[i]);
                std::copy(row + C / 2, row + C, previous + C / 2);
            }
        }
        linear(L + 2, xn.data(), qkv.data(), width, C, rows, threads);  // q (n_head heads), k, v (n_kv_head each)
        for (int64_t b = 0; b < rows; ++b) {
            float *q = &qkv[b * width], *k = q + C, *v = k + kv;
            // this sequence's keys and values: (n_kv_head, T, hs) of the cache's (rows, n_kv_head, T, hs)
            float *keys = (float*)L[20] + b * s.n_kv_head * T * hs, *values = (float*)L[21] + b * s.n_kv_head * T * hs;
            if (s.qk_norm) {
                for (int64_t hd = 0; hd < s.n_head; ++hd) rms_norm(q + hd * hs, q + hd * hs, hs);
                for (int64_t hd = 0; hd < s.n_kv_head; ++hd) rms_norm(k + hd * hs, k + hd * hs, hs);
            }
            if (s.rope_base > 0) {
                rotate(q, s.n_head, hs, cos.data(), sin.data());
                rotate(k, s.n_kv_head, hs, cos.data(), sin.data());
            }
            for (int64_t hd = 0; hd < s.n_kv_head; ++hd) {  // this position's key and value into the cache
                std::copy_n(k + hd * hs, hs, keys + (hd * T + t) * hs);
                std::copy_n(v + hd * hs, hs, values + (hd * T + t) * hs);
            }
            attend(q, keys, values, &y[b * C], t, s, (const float*)L[22], (const float*)L[23]);
        }
        linear(L + 6, y.data(), out.data(), C, C, rows, threads);
        for (int64_t i = 0; i < rows * C; ++i) x[i] += out[i];
        for (int64_t b = 0; b < rows; ++b) norm(&x[b * C], L + 10, &xn[b * C], C, s.rmsnorm);
        linear(L + 12, xn.data(), h.data(), fc_out, C, rows, threads);
        for (int64_t b = 0; b < rows; ++b) activate(&h[b * fc_out], s.hidden, s.mlp);
        // SwiGLU's product reads the first `hidden` of each row's 2 hidden: packed together first
        if (s.mlp == SWIGLU)
            for (int64_t b = 1; b < rows; ++b) std::copy_n(&h[b * fc_out], s.hidden, &h[b * s.hidden]);
        linear(L + 16, h.data(), out.data(), C, s.hidden, rows, threads);
        for (int64_t i = 0; i < rows * C; ++i) x[i] += out[i];
    }
    for (int64_t b = 0; b < rows; ++b) norm(&x[b * C], table + 2, &xn[b * C], C, s.rmsnorm);
    linear(table + 6, xn.data(), logits, s.vocab, C, rows, threads);
    if (s.softcap > 0) soft_cap(logits, rows * s.vocab, s.softcap);
}
