/* The decode forward of a Llama-family model on a CPU, in C: N tokens (rows x candidates) in
one call (mara_serve/engine/native/__init__.py builds and loads it).

Why: a one-row decode step in eager PyTorch is ~1,300 small ops; on a 2-core CPU their
dispatch costs as much as the weight reads (bench/RESULTS.md), and one-row bf16 matmuls go
through generic kernels. Here a whole step is one call and one OpenMP parallel region (torch's
own libgomp: the library is loaded after torch, so both share one thread pool): every
projection streams its weight once across the threads, and the per-token work between them
(norms, RoPE, attention, the MLP activation) is split across the same threads.

Numerics follow the eager runner (runner.py) op by op: activations are float32 buffers that,
for a bf16 model, are rounded to bf16 (round to nearest even) wherever the eager runner
produces a bf16 tensor — RMSNorm in float32, rounded, then scaled by the weight and rounded
(HF's order); RoPE as q*cos + rotate_half(q)*sin with each product and the sum rounded; SiLU
and the gate product rounded. Dot products accumulate in float32 (as torch's bf16 gemv does);
only their summation order differs from torch's kernels.

The KV cache is the runner's (L, slots, Hkv, capacity, d) tensors; token t writes its K/V at
position stores[t] of slots[t] and attends over [0, lengths[t]) plus stores[t] (the runner's
tree mask: a candidate of rank stores[t] - lengths[t] sees its row's prefix and itself). */

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

/* float -> bf16, round to nearest even (NaN stays a quiet NaN), without a branch so that
   the compiler vectorizes the loops that round a whole buffer. */
static inline uint16_t f_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
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

/* Dot products of weight rows with token inputs, float32 accumulation, in two shapes:
   - one row with 1, 2 or 4 tokens (`dot1_*`, `dot2_*`, `dot4_*`): below TILE_MIN_TOKENS
     tokens each weight row is streamed once, rows one after another (a sequential stream the
     prefetcher follows; interleaving four rows read memory slower), one accumulator chain per
     token, the row's later token groups reading it from L1. One token reads the weights at
     about a plain read's speed (30-33 GB/s vs 31-36 on a 2-core AVX512-BF16 EPYC,
     bench/RESULTS.md).
   - a tile of 4 rows x 4 tokens (`tile_*`): from TILE_MIN_TOKENS tokens on a step is bound by
     arithmetic, not memory, and a tile loads each weight vector once for 4 tokens and each
     input vector once for 4 rows (16 independent accumulators).
   Both sum every (row, token) product in the same order — one accumulator, 32 columns a step
   with AVX512-BF16's dot product (a bf16 model's inputs are rounded to bf16, so `xb` holds them
   exactly), then vector steps, then the tail — so a token's result never depends on what else
   is in the batch. AVX-512 or AVX2 by what the compiler targets; plain C otherwise. The
   (row, token) loops are unrolled so the accumulators stay in registers (rolled, gcc kept
   them on the stack and the tile ran at a third of its speed). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512 vec;
#define VW 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(a) _mm512_reduce_add_ps(a)
static inline __m512 vload_bf16(const uint16_t *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VW 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline __m256 vload_bf16(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
#else
typedef float vec;
#define VW 1
#define VZERO() 0.f
#define VLOAD(p) (*(p))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSUM(a) (a)
static inline float vload_bf16(const uint16_t *p) { return bf16_to_f(*p); }
#endif
#define VLOAD_F32(p) VLOAD(p)

/* Weights are prefetched 2 KB ahead of use into L1 and 6 KB ahead into L2: the hardware
   prefetcher alone left the loads waiting (10-30 % slower one- to eight-token forwards on the
   EPYC), and with the L1 prefetch alone a forward of 2-8 tokens, whose dot products take
   longer per row, still waited for memory (the L2 one: 4 tokens 13.6 -> 10.7 ms, 8 tokens
   17.4 -> 14.8, one token unchanged; bench/RESULTS.md). */
#define PREFETCH(p)                                                                         \
    (__builtin_prefetch((const char *)(p) + 2048, 0, 3),                                    \
     __builtin_prefetch((const char *)(p) + 6144, 0, 2))

#if defined(__AVX512BF16__)
#define DP_STEPS(R, K)                                                                      \
    for (; j + 32 <= cols; j += 32) {                                                       \
        __m512bh wv[R];                                                                     \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                               \
            PREFETCH(w + r * cols + j);                                                     \
            wv[r] = (__m512bh)_mm512_loadu_si512(w + r * cols + j);                         \
        }                                                                                   \
        _Pragma("GCC unroll 4") for (int t = 0; t < K; t++) {                                                       \
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + t * xs + j);                    \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) a[r][t] = _mm512_dpbf16_ps(a[r][t], wv[r], xv);     \
        }                                                                                   \
    }
#else
#define DP_STEPS(R, K) (void)xb;
#endif
#define NO_DP_STEPS(R, K) (void)xb;

/* out[t * os + r] = x_t . w_r for R rows (w_r = w + r * cols) and K tokens (x_t = x + t * xs) */
#define DEFINE_DOT(NAME, R, K, T, VLOADW, TO_F, STEPS)                                      \
    static inline void NAME(const T *w, long cols, const float *x, const uint16_t *xb,      \
                            long xs, float *out, long os) {                                 \
        vec a[R][K];                                                                        \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                         \
            _Pragma("GCC unroll 4") for (int t = 0; t < K; t++) a[r][t] = VZERO();                                  \
        long j = 0;                                                                         \
        STEPS(R, K)                                                                         \
        for (; j + VW <= cols; j += VW) {                                                   \
            vec wv[R];                                                                      \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                           \
                PREFETCH(w + r * cols + j);                                                 \
                wv[r] = VLOADW(w + r * cols + j);                                           \
            }                                                                               \
            _Pragma("GCC unroll 4") for (int t = 0; t < K; t++) {                                                   \
                vec xv = VLOAD(x + t * xs + j);                                             \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) a[r][t] = VFMA(wv[r], xv, a[r][t]);             \
            }                                                                               \
        }                                                                                   \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                         \
            _Pragma("GCC unroll 4") for (int t = 0; t < K; t++) {                                                   \
                float s = VSUM(a[r][t]);                                                    \
                for (long jj = j; jj < cols; jj++) s += TO_F(w[r * cols + jj]) * x[t * xs + jj]; \
                out[t * os + r] = s;                                                        \
            }                                                                               \
    }

static inline float f32_id(float v) { return v; }
DEFINE_DOT(dot1_bf16, 1, 1, uint16_t, vload_bf16, bf16_to_f, DP_STEPS)
DEFINE_DOT(dot2_bf16, 1, 2, uint16_t, vload_bf16, bf16_to_f, DP_STEPS)
DEFINE_DOT(dot4_bf16, 1, 4, uint16_t, vload_bf16, bf16_to_f, DP_STEPS)
DEFINE_DOT(tile_bf16, 4, 4, uint16_t, vload_bf16, bf16_to_f, DP_STEPS)
DEFINE_DOT(dot1_f32, 1, 1, float, VLOAD_F32, f32_id, NO_DP_STEPS)
DEFINE_DOT(dot2_f32, 1, 2, float, VLOAD_F32, f32_id, NO_DP_STEPS)
DEFINE_DOT(dot4_f32, 1, 4, float, VLOAD_F32, f32_id, NO_DP_STEPS)
DEFINE_DOT(tile_f32, 4, 4, float, VLOAD_F32, f32_id, NO_DP_STEPS)

/* One row with tokens [t0, n): four, two, then one at a time (independent accumulator chains:
   one token's chain alone is bound by the instruction latency once the row is in L1). */
#define DEFINE_ROW(NAME, T, DOT1, DOT2, DOT4)                                               \
    static inline void NAME(const T *wi, long cols, const float *x, const uint16_t *xb,     \
                            long t, long n, float *y, long rows) {                          \
        for (; t + 4 <= n; t += 4) DOT4(wi, cols, x + t * cols, xb + t * cols, cols, y + t * rows, rows); \
        for (; t + 2 <= n; t += 2) DOT2(wi, cols, x + t * cols, xb + t * cols, cols, y + t * rows, rows); \
        for (; t < n; t++) DOT1(wi, cols, x + t * cols, xb + t * cols, cols, y + t * rows, rows);        \
    }

DEFINE_ROW(row_bf16, uint16_t, dot1_bf16, dot2_bf16, dot4_bf16)
DEFINE_ROW(row_f32, float, dot1_f32, dot2_f32, dot4_f32)

/* y[t * rows + i] = x_t . w[i] for n tokens (x_t = x + t * cols), w (rows, cols): rows split
   across the threads of the enclosing parallel region (an orphaned `omp for`: every caller is
   inside one) so each weight byte is read once. Row by row up to TILE_MIN_TOKENS tokens (each
   row is streamed once and stays in L1 for its token groups; bench/RESULTS.md: 4 x 4 tiles,
   four interleaved row streams, read memory slower below that), 4 x 4 tiles from there. */
#define TILE_MIN_TOKENS 32
#define DEFINE_GEMM(NAME, T, ROW, TILE)                                                     \
    static void NAME(const T *w, const float *x, const uint16_t *xb, float *y, long n,      \
                     long rows, long cols) {                                                \
        long tiled = n >= TILE_MIN_TOKENS ? rows / 4 * 4 : 0, tn = n / 4 * 4;               \
        _Pragma("omp for schedule(static) nowait")                                         \
        for (long i = 0; i < tiled; i += 4) {                                               \
            const T *wi = w + i * cols;                                                     \
            for (long t = 0; t < tn; t += 4)                                                \
                TILE(wi, cols, x + t * cols, xb + t * cols, cols, y + t * rows + i, rows);  \
            for (long r = 0; r < 4; r++)                                                    \
                ROW(wi + r * cols, cols, x, xb, tn, n, y + i + r, rows);                    \
        }                                                                                   \
        _Pragma("omp for schedule(static)")                                                \
        for (long i = tiled; i < rows; i++) ROW(w + i * cols, cols, x, xb, 0, n, y + i, rows); \
    }

DEFINE_GEMM(gemm_bf16, uint16_t, row_bf16, tile_bf16)
DEFINE_GEMM(gemm_f32, float, row_f32, tile_f32)

/* y (n x rows) = x (n x cols) . w^T (+ b), rounded to the dtype like the eager projection
   (the sum rounded, then the bias added and rounded). `xb`: room for n x cols bf16. Called by
   every thread of a parallel region (each loop is a worksharing loop; the barriers at their
   ends order the steps). */
static void linear(const mara_decoder *m, const void *w, const void *b, const float *x,
                   uint16_t *xb, float *y, long n, long rows, long cols) {
    if (m->bf16) {
#pragma omp for schedule(static)
        for (long j = 0; j < n * cols; j++) xb[j] = f_to_bf16(x[j]);
        gemm_bf16((const uint16_t *)w, x, xb, y, n, rows, cols);
    } else {
        gemm_f32((const float *)w, x, xb, y, n, rows, cols);
    }
    /* bf16: the sum rounded once, as torch's bf16 matmul; then the bias added and rounded */
    if (m->bf16 || b) {
#pragma omp for schedule(static)
        for (long i = 0; i < n * rows; i++) {
            float v = rnd(m, y[i]);
            y[i] = b ? rnd(m, v + load(m, b, i % rows)) : v;
        }
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

/* acc[j] += a * v[j] for a row of d values in the model dtype. */
static inline void axpy(const mara_decoder *m, float *acc, float a, const void *v, long d) {
    if (m->bf16) {
        const uint16_t *vb = (const uint16_t *)v;
#pragma omp simd
        for (long j = 0; j < d; j++) acc[j] += a * bf16_to_f(vb[j]);
    } else {
        const float *vf = (const float *)v;
#pragma omp simd
        for (long j = 0; j < d; j++) acc[j] += a * vf[j];
    }
}

/* One query head against its kv head: keys [0, length) and `store`; out (d). Scores with the
   projections' dot kernels (q is rounded to the dtype, so exact as bf16), softmax in float32. */
static void attend_head(const mara_decoder *m, const float *q, const void *k, const void *v,
                        long length, long store, float *scores, float *out) {
    long d = m->head_dim, n = length + 1, elt = m->bf16 ? 2 : 4;
    uint16_t qb[512];
    for (long j = 0; j < d; j++) qb[j] = f_to_bf16(q[j]);
    float mx = -INFINITY;
    for (long t = 0; t < n; t++) {
        long p = t < length ? t : store;
        if (m->bf16)
            dot1_bf16((const uint16_t *)k + p * d, d, q, qb, 0, scores + t, 0);
        else
            dot1_f32((const float *)k + p * d, d, q, qb, 0, scores + t, 0);
        scores[t] *= m->scale;
        if (scores[t] > mx) mx = scores[t];
    }
    float sum = 0.f;
    for (long t = 0; t < n; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    float acc[512] = {0};
    for (long t = 0; t < n; t++) {
        long p = t < length ? t : store;
        axpy(m, acc, scores[t] / sum, (const char *)v + p * d * elt, d);
    }
    for (long j = 0; j < d; j++) out[j] = rnd(m, acc[j]);
}

/* The MLP activation: SiLU (__init__.py refuses a model with any other). */
static inline float silu(float g) { return g / (1.f + expf(-g)); }

static long widest_input(const mara_decoder *m) {
    long w = m->hidden > m->inter ? m->hidden : m->inter;
    long a = (long)m->n_heads * m->head_dim;
    return w > a ? w : a;
}

/* Floats of scratch `mara_decode` needs for n tokens reading up to max_keys keys each. */
long mara_scratch_floats(const mara_decoder *m, long n, long max_keys) {
    long H = m->hidden, d = m->head_dim;
    long qkv = (long)(m->n_heads + 2 * m->n_kv_heads) * d;
    long per_token = 3 * H + qkv + (long)m->n_heads * d + 3 * (long)m->inter +
                     (widest_input(m) + 1) / 2 + (long)m->n_heads * max_keys;
    return n * per_token + 64;
}

/* Decode n tokens, each its own (slot, length, store): token t's K/V are written at position
   stores[t] of slots[t] in every layer, it attends over [0, lengths[t]) and stores[t] (a
   candidate of rank stores[t] - lengths[t] sees its row's prefix and itself, never another
   candidate), and its final normed hidden state (H, model dtype) goes to out + t * H. Several
   candidates of one row share a slot: each writes its own store position and reads the
   prefix only. `scratch` holds mara_scratch_floats(m, n, max(lengths) + 1) floats. */
void mara_decode(const mara_decoder *m, long n, const long *tokens, const long *slots,
                 const long *lengths, const long *stores, void *out, float *scratch) {
    long H = m->hidden, d = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads, I = m->inter;
    long g = Hq / Hkv, qkv_rows = (Hq + 2 * Hkv) * d, max_keys = 0;
    for (long t = 0; t < n; t++)
        if (lengths[t] + 1 > max_keys) max_keys = lengths[t] + 1;
    float *x = scratch, *h = x + n * H, *o = h + n * H, *qkv = o + n * H;
    float *att = qkv + n * qkv_rows, *gu = att + n * Hq * d, *scores = gu + n * 2 * I;
    float *act = scores + n * Hq * max_keys;
    uint16_t *xb = (uint16_t *)(act + n * I);
    long elt = m->bf16 ? 2 : 4;
    long layer_stride = m->slots * Hkv * m->capacity * d, head_stride = m->capacity * d;

    /* One parallel region for the whole forward: every step is a worksharing loop (the
       projections over weight rows, the rest over tokens, heads or elements), so nothing runs
       on one thread while the other waits, and the threads are forked once, not ~150 times. */
#pragma omp parallel num_threads(m->n_threads)
    {
#pragma omp for schedule(static)
        for (long t = 0; t < n; t++)
            for (long i = 0; i < H; i++) x[t * H + i] = load(m, m->embed, tokens[t] * H + i);
        for (int l = 0; l < m->n_layers; l++) {
            char *keys = (char *)m->keys + l * layer_stride * elt;
            char *values = (char *)m->values + l * layer_stride * elt;
#pragma omp for schedule(static)
            for (long t = 0; t < n; t++) rms_norm(m, x + t * H, m->ln1_w[l], m->ln1_eps[l], h + t * H);
            linear(m, m->qkv_w[l], m->qkv_b[l], h, xb, qkv, n, qkv_rows, H);
            /* RoPE on every q and k head; a k head also writes its K and V to the cache */
#pragma omp for schedule(static)
            for (long th = 0; th < n * (Hq + Hkv); th++) {
                long t = th / (Hq + Hkv), hd = th % (Hq + Hkv);
                float *qt = qkv + t * qkv_rows;
                rope(m, qt + hd * d, m->cos, m->sin, lengths[t]);
                if (hd >= Hq) {
                    long kh = hd - Hq, at = ((slots[t] * Hkv + kh) * head_stride + stores[t] * d) * elt;
                    for (long j = 0; j < d; j++) {
                        put(m, keys + at, j, qt[(Hq + kh) * d + j]);
                        put(m, values + at, j, qt[(Hq + Hkv + kh) * d + j]);
                    }
                }
            }
#pragma omp for schedule(static)
            for (long th = 0; th < n * Hq; th++) {
                long t = th / Hq, qh = th % Hq, kh = qh / g;
                long base = ((slots[t] * Hkv + kh) * head_stride) * elt;
                attend_head(m, qkv + t * qkv_rows + qh * d, keys + base, values + base,
                            lengths[t], stores[t], scores + th * max_keys, att + t * Hq * d + qh * d);
            }
            linear(m, m->o_w[l], m->o_b[l], att, xb, o, n, H, Hq * d);
#pragma omp for schedule(static)
            for (long t = 0; t < n; t++) {
                for (long i = t * H; i < (t + 1) * H; i++) x[i] = rnd(m, x[i] + o[i]);
                rms_norm(m, x + t * H, m->ln2_w[l], m->ln2_eps[l], h + t * H);
            }
            linear(m, m->gate_up_w[l], m->gate_up_b[l], h, xb, gu, n, 2 * I, H);
            /* SiLU(gate) * up, into its own buffer (threads split the elements) */
#pragma omp for schedule(static)
            for (long e = 0; e < n * I; e++) {
                long t = e / I, i = e % I;
                const float *gt = gu + t * 2 * I;
                act[e] = rnd(m, rnd(m, silu(gt[i])) * gt[I + i]);
            }
            linear(m, m->down_w[l], m->down_b[l], act, xb, o, n, H, I);
#pragma omp for schedule(static)
            for (long i = 0; i < n * H; i++) x[i] = rnd(m, x[i] + o[i]);
        }
#pragma omp for schedule(static)
        for (long t = 0; t < n; t++) {
            rms_norm(m, x + t * H, m->norm_w, m->norm_eps, h + t * H);
            for (long i = 0; i < H; i++) put(m, out, t * H + i, h[t * H + i]);
        }
    }
}

/* y (n x rows) = x (n x cols) . w^T in the model dtype, rounded like the eager head: the LM
   head on the chosen states. `scratch`: n * (2 * cols + rows) floats. */
void mara_head(const mara_decoder *m, const void *w, const void *x, void *y, long n, long rows,
               long cols, float *scratch) {
    float *xf = scratch, *yf = scratch + n * cols;
    uint16_t *xb = (uint16_t *)(yf + n * rows);
#pragma omp parallel num_threads(m->n_threads)
    {
#pragma omp for schedule(static)
        for (long j = 0; j < n * cols; j++) xf[j] = load(m, x, j);
        linear(m, w, 0, xf, xb, yf, n, rows, cols);
#pragma omp for schedule(static)
        for (long i = 0; i < n * rows; i++) put(m, y, i, yf[i]);
    }
}
