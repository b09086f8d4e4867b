// Decoding's matrix-vector products: y[o] = scale[o] * sum_i w[o, i] x[i] + bias[o] for one row x.
//
// Built by mygpt/matvec.py with inductor's C++ toolchain (the flags torch.compile's own kernels get, among them
// -march=native), so the #if branches below are the instructions this machine has: AVX-512 (with its bf16 and
// VNNI dot products where present), AVX2, or plain loops elsewhere. Every branch computes the same sums: the
// products are exact in fp32 (bf16 x bf16, int8 x fp32 of an int8 or bf16 value, int8 x int8 in int32), only
// the order of the fp32 additions differs. Independent accumulators: one would wait on its own latency.
//
// kind  weights  x as multiplied
// 0     fp32     fp32
// 1     bf16     rounded to bf16 (as bf16 autocast casts a Linear's input), products exact in fp32
// 2     int8     fp32, times scale[o] (the weights dequantized as they are read)
// 3     int8     int8 in blocks of 32, each with its fp32 step d = max|x| / 127 (llama.cpp's q8_0):
//                int32 sums per block, times d, times scale[o]

#include <torch/csrc/inductor/cpp_prefix.h>
#include <cstring>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

constexpr int64_t QBLOCK = 32;

static inline float bf16_value(uint16_t b) {  // a bf16 is the upper half of an fp32
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest, ties to even (finite values)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#if defined(__AVX512F__)
static inline float sum16(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif
#if defined(__AVX2__)
static inline float sum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Each weight widened to fp32 as it is read: one at a time, or 16 (AVX-512) or 8 (AVX2) at a time
static inline float widen(float w) { return w; }
static inline float widen(int8_t w) { return float(w); }
static inline float widen(uint16_t w) { return bf16_value(w); }  // a bf16's bits
#if defined(__AVX512F__)
static inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 widen16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 widen16(const uint16_t* p) {  // the bits shifted up into an fp32's upper half
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 widen8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline __m256 widen8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

// sum_i w[i] x[i] for fp32, int8 or bf16 (uint16_t) weights and fp32 x, each weight widened to fp32
template <typename T>
static float dot(const T* w, const float* x, int64_t n) {
    int64_t i = 0;
    float s = 0;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(widen16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(widen16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(widen16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(widen16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    s = sum16(a0, a1, a2, a3);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(widen8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(widen8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(widen8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(widen8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    s = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < n; ++i) s += widen(w[i]) * x[i];
    return s;
}

// bf16 weights times x rounded to bf16 (xb; xr: the same values in fp32): with AVX512-BF16, 32 products of bf16
// pairs an instruction, summed in fp32 in eight sums apart (with four, GPT-2 124M's 49 products took 3-4% longer on
// 2 threads of an AMD EPYC: 5.66-5.88 against 5.48-5.64 ms; the same on 1); elsewhere dot's, each weight widened
static float dot_bf16(const uint16_t* w, const uint16_t* xb, const float* xr, int64_t n) {
#if defined(__AVX512BF16__)
    int64_t i = 0;
    __m512 a[8];
    for (auto& sum : a) sum = _mm512_setzero_ps();
    auto step = [&](int k, int64_t at) {
        a[k] = _mm512_dpbf16_ps(a[k], (__m512bh)_mm512_loadu_si512(w + at), (__m512bh)_mm512_loadu_si512(xb + at));
    };
    for (; i + 256 <= n; i += 256)
        for (int k = 0; k < 8; ++k) step(k, i + 32 * k);
    for (; i + 32 <= n; i += 32) step(0, i);
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                             _mm512_add_ps(_mm512_add_ps(a[4], a[5]), _mm512_add_ps(a[6], a[7])));
    return _mm512_reduce_add_ps(s) + dot(w + i, xr + i, n - i);
#else
    (void)xb;
    return dot(w, xr, n);
#endif
}

#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
// the 8 int32 sums of 4 adjacent products of one 32-block: x and w are int8 in [-127, 127]. The instructions
// multiply unsigned by signed bytes, so |x| times w with x's sign moved onto it (llama.cpp's trick)
static inline __m256i block_dot(const int8_t* w, const int8_t* x) {
    __m256i xv = _mm256_loadu_si256((const __m256i*)x), wv = _mm256_loadu_si256((const __m256i*)w);
    __m256i ax = _mm256_sign_epi8(xv, xv), sw = _mm256_sign_epi8(wv, xv);
    // pairs summed in int16 (at most 2 * 127 * 127, no saturation), then in int32
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
}
#endif

// xq: x in int8; d8: the step of each 32-block of it, 8 times over (a vector's worth for each block's 8 sums);
// xa, neg: |xq| and the 64-bit masks of its negative entries, for AVX-512 (made once a call, not once a row)
static float dot_q8(const int8_t* w, const int8_t* xq, const uint8_t* xa, const uint64_t* neg, const float* d8,
                    int64_t n) {
    int64_t i = 0;
    float s = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)  // two blocks a step: 16 int32 sums, 8 for each
    auto step = [&](int64_t i, __m512 a) {
        __m512i wv = _mm512_loadu_si512(w + i);
        __m512i sw = _mm512_mask_sub_epi8(wv, neg[i / 64], _mm512_setzero_si512(), wv);
        __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xa + i), sw);
        return _mm512_fmadd_ps(_mm512_loadu_ps(d8 + i / 4), _mm512_cvtepi32_ps(sums), a);
    };
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; i + 128 <= n; i += 128) {
        a0 = step(i, a0);
        a1 = step(i + 64, a1);
    }
    if (i + 64 <= n) {
        a0 = step(i, a0);
        i += 64;
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; i + 2 * QBLOCK <= n; i += 2 * QBLOCK) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(d8 + i / 4), _mm256_cvtepi32_ps(block_dot(w + i, xq + i)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(d8 + i / 4 + 8),
                             _mm256_cvtepi32_ps(block_dot(w + i + QBLOCK, xq + i + QBLOCK)), a1);
    }
    s = sum8(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; i += QBLOCK) {
        int32_t block = 0;
        for (int64_t j = i; j < std::min(n, i + QBLOCK); ++j) block += int32_t(w[j]) * int32_t(xq[j]);
        s += d8[i / 4] * float(block);
    }
    return s;
}

// x (n) quantized for dot_q8: xq, d8 (each block's step, 8 times), and for AVX-512 xa and neg
static void quantize_q8(const float* x, int64_t n, std::vector<int8_t>& xq, std::vector<float>& d8,
                        std::vector<uint8_t>& xa, std::vector<uint64_t>& neg) {
    xq.resize(n);
    d8.resize((n + QBLOCK - 1) / QBLOCK * 8);
    for (int64_t i = 0; i < n; i += QBLOCK) {
        int64_t end = std::min(n, i + QBLOCK), j = i;
        float amax = 0;
#if defined(__AVX512F__)
        if (end - i == QBLOCK)
            amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)),
                                                      _mm512_abs_ps(_mm512_loadu_ps(x + i + 16))));
        else
#endif
        for (int64_t k = i; k < end; ++k) amax = std::max(amax, std::fabs(x[k]));
        float d = amax / 127.0f, e = d > 0 ? d : 1.0f;  // e: an all-zero block stays zero
        std::fill(d8.begin() + i / 4, d8.begin() + i / 4 + 8, d);
#if defined(__AVX512F__)  // x / e rounded to nearest even by the conversion itself, 16 at a time
        for (; j + 16 <= end; j += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(e)));
            _mm_storeu_si128((__m128i*)(xq.data() + j), _mm512_cvtepi32_epi8(q));
        }
#endif
        for (; j < end; ++j) xq[j] = int8_t(std::nearbyint(x[j] / e));
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    xa.resize(n);
    neg.assign((n + 63) / 64, 0);
    for (int64_t i = 0; i + 64 <= n; i += 64) {  // the rest of x: dot_q8's plain loop reads xq
        __m512i v = _mm512_loadu_si512(xq.data() + i);
        _mm512_storeu_si512(xa.data() + i, _mm512_abs_epi8(v));
        neg[i / 64] = _mm512_movepi8_mask(v);
    }
#endif
}

// one row of x as kind multiplies it: kind 1 in bf16 (xb) and the same values in fp32 (xr); kind 3 in int8 blocks
// (xq; xr: each block's step, 8 times; xa, neg: |xq| and its signs for AVX-512)
struct Prepared {
    std::vector<uint16_t> xb;
    std::vector<float> xr;
    std::vector<int8_t> xq;
    std::vector<uint8_t> xa;
    std::vector<uint64_t> neg;

    Prepared(const float* x, int64_t n, int64_t kind) {
        if (kind == 1) {
            xb.resize(n);
            xr.resize(n);
            for (int64_t i = 0; i < n; ++i) {
                xb[i] = to_bf16(x[i]);
                xr[i] = bf16_value(xb[i]);
            }
        } else if (kind == 3) {
            quantize_q8(x, n, xq, xr, xa, neg);
        }
    }
};

// scale[o] sum_i w[o, i] x[i] for weight row o
static inline float row_dot(const void* weight, int64_t o, const float* x, const Prepared& p, const float* scale,
                            int64_t kind, int64_t n) {
    if (kind == 0) return dot((const float*)weight + o * n, x, n);
    if (kind == 1) return dot_bf16((const uint16_t*)weight + o * n, p.xb.data(), p.xr.data(), n);
    if (kind == 2) return dot((const int8_t*)weight + o * n, x, n) * scale[o];
    return dot_q8((const int8_t*)weight + o * n, p.xq.data(), p.xa.data(), p.neg.data(), p.xr.data(), n) * scale[o];
}

// y (rows, n_out) for x (rows, n_in): each weight row is read from memory once, for every row of x while it is in
// cache (decode.cpp's steps of several sequences). bias may be null (no bias).
static void matvec(const void* weight, const float* x, const float* scale, const float* bias, float* y,
                   int64_t kind, int64_t n_out, int64_t n_in, int64_t threads, int64_t rows = 1) {
    std::vector<Prepared> prepared;
    for (int64_t b = 0; b < rows; ++b) prepared.emplace_back(x + b * n_in, n_in, kind);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t o = 0; o < n_out; ++o) {
        for (int64_t b = 0; b < rows; ++b) {
            float s = row_dot(weight, o, x + b * n_in, prepared[b], scale, kind, n_in);
            y[b * n_out + o] = bias ? s + bias[o] : s;
        }
    }
}

#ifndef MYGPT_MATVEC_NO_ENTRY  // mygpt/decode.py builds this file with decode.cpp, whose entry point is its own
extern "C" void kernel(const void* weight, const float* x, const float* scale, const float* bias, float* y,
                       int64_t kind, int64_t n_out, int64_t n_in, int64_t threads) {
    matvec(weight, x, scale, bias, y, kind, n_out, n_in, threads);
}
#endif
