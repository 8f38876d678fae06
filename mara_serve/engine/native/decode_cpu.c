/* One-token decode forward of a Llama-family model on a CPU, in C (native.py builds and loads it).

Why: a one-row decode step in eager PyTorch is ~1,300 small ops; on a 2-core CPU their
dispatch costs as much as the weight reads (bench/RESULTS.md), and one-row bf16 matmuls go
through generic kernels. Here a whole token is one call: every projection is a gemv that
streams its weight once across the OpenMP threads (torch's own libgomp: native.py loads this
library after torch, so both share one thread pool), the rest is a few loops over H floats.

Numerics follow the eager runner (runner.py) op by op: activations are float32 buffers that,
for a bf16 model, are rounded to bf16 (round to nearest even) wherever the eager runner
produces a bf16 tensor — RMSNorm in float32, rounded, then scaled by the weight and rounded
(HF's order); RoPE as q*cos + rotate_half(q)*sin with each product and the sum rounded; SiLU
and the gate product rounded. Dot products accumulate in float32 (as torch's bf16 gemv does);
only their summation order differs from torch's kernels.

The KV cache is the runner's (L, slots, Hkv, capacity, d) tensors; this call writes the token's
K/V at `store` and attends over positions [0, length) plus `store` (the runner's tree mask for
one candidate of rank store - length). */

#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

typedef struct {
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, inter;
    int bf16;       /* weights, cache and tables are bf16 (else float32) */
    int n_threads;
    int silu;       /* the MLP activation is SiLU (the only one native.py passes) */
    float scale;    /* attention scale */
    long slots, capacity; /* KV cache shape (per layer: slots x Hkv x capacity x d) */
    const void *const *ln1_w, *const *ln2_w;
    const float *ln1_eps, *ln2_eps;
    const void *const *qkv_w, *const *qkv_b, *const *o_w, *const *o_b;
    const void *const *gate_up_w, *const *gate_up_b, *const *down_w, *const *down_b;
    const void *norm_w;
    float norm_eps;
    const void *embed; /* (vocab, H) */
    void *keys, *values;
    const void *cos, *sin; /* (positions, d) */
} mara_decoder;

static inline float bf16_to_f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* A float rounded to the model dtype (identity for float32). */
static inline float rnd(const mara_decoder *m, float f) {
    return m->bf16 ? bf16_to_f(f_to_bf16(f)) : f;
}

static inline float load(const mara_decoder *m, const void *p, long i) {
    return m->bf16 ? bf16_to_f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put(const mara_decoder *m, void *p, long i, float f) {
    if (m->bf16)
        ((uint16_t *)p)[i] = f_to_bf16(f);
    else
        ((float *)p)[i] = f;
}

/* The dot product of one weight row with x (cols floats; for a bf16 model `xb` holds x as
   bf16, exact since every gemv input is rounded to bf16). Rows are read one after another
   (a sequential stream the prefetcher follows: faster than interleaving several rows) with
   independent accumulators (one chain is bound by the FMA latency, not by memory). AVX-512,
   with AVX512-BF16's dot-product instruction where the CPU has it, or AVX2; plain C otherwise.
   Measured on a 2-core AVX512-BF16 EPYC, 30 matrices 3072 x 576: one row per step with the
   bf16 dot product 30-33 GB/s, a plain read of the same bytes 31-36 GB/s (bench/RESULTS.md). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline __m512 bf16x16(const uint16_t *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline float dot_bf16(const uint16_t *w, long cols, const float *x, const uint16_t *xb) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    long j = 0;
#if defined(__AVX512BF16__)
    for (; j + 64 <= cols; j += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j),
                              (__m512bh)_mm512_loadu_si512(xb + j));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + j + 32),
                              (__m512bh)_mm512_loadu_si512(xb + j + 32));
    }
#else
    (void)xb;
#endif
    for (; j + 32 <= cols; j += 32) {
        a0 = _mm512_fmadd_ps(bf16x16(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(bf16x16(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
    }
    float r = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; j < cols; j++) r += bf16_to_f(w[j]) * x[j];
    return r;
}

static inline float dot_f32(const float *w, long cols, const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long j = 0;
    for (; j + 64 <= cols; j += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    for (; j + 16 <= cols; j += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
    float r = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; j < cols; j++) r += w[j] * x[j];
    return r;
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 bf16x8(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static inline float dot_bf16(const uint16_t *w, long cols, const float *x, const uint16_t *xb) {
    (void)xb;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long j = 0;
    for (; j + 32 <= cols; j += 32) {
        a0 = _mm256_fmadd_ps(bf16x8(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(bf16x8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    for (; j + 8 <= cols; j += 8) a0 = _mm256_fmadd_ps(bf16x8(w + j), _mm256_loadu_ps(x + j), a0);
    float r = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < cols; j++) r += bf16_to_f(w[j]) * x[j];
    return r;
}

static inline float dot_f32(const float *w, long cols, const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long j = 0;
    for (; j + 32 <= cols; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    for (; j + 8 <= cols; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
    float r = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < cols; j++) r += w[j] * x[j];
    return r;
}
#else
static inline float dot_bf16(const uint16_t *w, long cols, const float *x, const uint16_t *xb) {
    (void)xb;
    float acc = 0.f;
    for (long j = 0; j < cols; j++) acc += bf16_to_f(w[j]) * x[j];
    return acc;
}

static inline float dot_f32(const float *w, long cols, const float *x) {
    float acc = 0.f;
    for (long j = 0; j < cols; j++) acc += w[j] * x[j];
    return acc;
}
#endif

/* y[i] = x . w[i] for i < rows, w (rows, cols): float32 accumulation, rows split across the
   threads so each weight byte is read once. */
static void gemv_bf16(const uint16_t *w, const float *x, const uint16_t *xb, float *y,
                      long rows, long cols, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < rows; i++) y[i] = dot_bf16(w + i * cols, cols, x, xb);
}

static void gemv_f32(const float *w, const float *x, float *y, long rows, long cols, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < rows; i++) y[i] = dot_f32(w + i * cols, cols, x);
}

static void linear(const mara_decoder *m, const void *w, const void *b, const float *x, float *y,
                   long rows, long cols) {
    if (m->bf16) {
        uint16_t xb[cols]; /* x as bf16 (exact: every gemv input is rounded to bf16) */
        for (long j = 0; j < cols; j++) xb[j] = f_to_bf16(x[j]);
        gemv_bf16((const uint16_t *)w, x, xb, y, rows, cols, m->n_threads);
    }
    else
        gemv_f32((const float *)w, x, y, rows, cols, m->n_threads);
    for (long i = 0; i < rows; i++) {
        float v = m->bf16 ? rnd(m, y[i]) : y[i];
        if (b) v = rnd(m, v + load(m, b, i));
        y[i] = v;
    }
}

/* HF's RMSNorm: float32 x * rsqrt(mean(x^2) + eps), rounded to the dtype, times the weight. */
static void rms_norm(const mara_decoder *m, const float *x, const void *w, float eps, float *y) {
    long H = m->hidden;
    float ss = 0.f;
    for (long i = 0; i < H; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)H + eps);
    for (long i = 0; i < H; i++) y[i] = rnd(m, load(m, w, i) * rnd(m, x[i] * r));
}

/* RoPE on one head in place: x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1). */
static void rope(const mara_decoder *m, float *x, const void *cos, const void *sin, long pos) {
    long d = m->head_dim, h = d / 2;
    float tmp[512];
    for (long i = 0; i < d; i++) {
        float rot = i < h ? -x[i + h] : x[i - h];
        float c = load(m, cos, pos * d + i), s = load(m, sin, pos * d + i);
        tmp[i] = rnd(m, rnd(m, x[i] * c) + rnd(m, rot * s));
    }
    memcpy(x, tmp, d * sizeof(float));
}

/* One query head against its kv head: keys [0, length) and `store`; out (d). */
static void attend_head(const mara_decoder *m, const float *q, const void *k, const void *v,
                        long length, long store, float *scores, float *out) {
    long d = m->head_dim, n = length + 1;
    float mx = -INFINITY;
    for (long t = 0; t < n; t++) {
        long p = t < length ? t : store;
        float s = 0.f;
        for (long j = 0; j < d; j++) s += q[j] * load(m, k, p * d + j);
        s *= m->scale;
        scores[t] = s;
        if (s > mx) mx = s;
    }
    float sum = 0.f;
    for (long t = 0; t < n; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    float acc[512] = {0};
    for (long t = 0; t < n; t++) {
        long p = t < length ? t : store;
        float w = scores[t] / sum;
        for (long j = 0; j < d; j++) acc[j] += w * load(m, v, p * d + j);
    }
    for (long j = 0; j < d; j++) out[j] = rnd(m, acc[j]);
}

static inline float act(const mara_decoder *m, float g) {
    (void)m;
    return g / (1.f + expf(-g)); /* SiLU */
}

/* Floats of scratch `mara_decode_one` needs (the caller allocates it once). */
long mara_scratch_floats(const mara_decoder *m, long max_keys) {
    long H = m->hidden, d = m->head_dim;
    long qkv = (long)(m->n_heads + 2 * m->n_kv_heads) * d;
    return 3 * H + qkv + (long)m->n_heads * d + 2 * (long)m->inter + m->n_heads * max_keys;
}

/* Decode `token` for `slot`: writes its K/V at `store` in every layer, attends over
   [0, length) and `store`, and writes the final normed hidden state (H, model dtype) to `out`.
   `scratch` holds mara_scratch_floats(m, length + 1) floats. */
void mara_decode_one(const mara_decoder *m, long token, long slot, long length, long store,
                     void *out, float *scratch) {
    long H = m->hidden, d = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads, I = m->inter;
    long g = Hq / Hkv, qkv_rows = (Hq + 2 * Hkv) * d;
    float *x = scratch, *h = x + H, *o = h + H, *qkv = o + H, *att = qkv + qkv_rows;
    float *gu = att + Hq * d, *scores = gu + 2 * I;
    long elt = m->bf16 ? 2 : 4;
    long layer_stride = m->slots * Hkv * m->capacity * d, head_stride = m->capacity * d;

    for (long i = 0; i < H; i++) x[i] = load(m, m->embed, token * H + i);
    for (int l = 0; l < m->n_layers; l++) {
        rms_norm(m, x, m->ln1_w[l], m->ln1_eps[l], h);
        linear(m, m->qkv_w[l], m->qkv_b[l], h, qkv, qkv_rows, H);
        for (long hd = 0; hd < Hq + Hkv; hd++) rope(m, qkv + hd * d, m->cos, m->sin, length);
        char *kbase = (char *)m->keys + (l * layer_stride + slot * Hkv * head_stride) * elt;
        char *vbase = (char *)m->values + (l * layer_stride + slot * Hkv * head_stride) * elt;
        for (long kh = 0; kh < Hkv; kh++) {
            for (long j = 0; j < d; j++) {
                put(m, kbase + kh * head_stride * elt, store * d + j, qkv[(Hq + kh) * d + j]);
                put(m, vbase + kh * head_stride * elt, store * d + j,
                      qkv[(Hq + Hkv + kh) * d + j]);
            }
        }
#pragma omp parallel for num_threads(m->n_threads) schedule(static)
        for (long qh = 0; qh < Hq; qh++) {
            long kh = qh / g;
            attend_head(m, qkv + qh * d, kbase + kh * head_stride * elt,
                        vbase + kh * head_stride * elt, length, store,
                        scores + qh * (length + 1), att + qh * d);
        }
        linear(m, m->o_w[l], m->o_b[l], att, o, H, Hq * d);
        for (long i = 0; i < H; i++) x[i] = rnd(m, x[i] + o[i]);
        rms_norm(m, x, m->ln2_w[l], m->ln2_eps[l], h);
        linear(m, m->gate_up_w[l], m->gate_up_b[l], h, gu, 2 * I, H);
        for (long i = 0; i < I; i++) gu[i] = rnd(m, rnd(m, act(m, gu[i])) * gu[I + i]);
        linear(m, m->down_w[l], m->down_b[l], gu, o, H, I);
        for (long i = 0; i < H; i++) x[i] = rnd(m, x[i] + o[i]);
    }
    float *y = h;
    rms_norm(m, x, m->norm_w, m->norm_eps, y);
    for (long i = 0; i < H; i++) put(m, out, i, y[i]);
}

/* y (rows) = w (rows, cols) . x (cols) in the model dtype, rounded like torch.mv: the one-row
   LM head. */
void mara_gemv(const mara_decoder *m, const void *w, const void *x, void *y, long rows,
               long cols, float *scratch) {
    float *xf = scratch, *yf = scratch + cols;
    for (long j = 0; j < cols; j++) xf[j] = load(m, x, j);
    linear(m, w, 0, xf, yf, rows, cols);
    for (long i = 0; i < rows; i++) put(m, y, i, yf[i]);
}
