/* Matrix products for decode steps of a few rows: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * A decode step of one stream multiplies one activation row by every weight matrix, so its time
 * is the time to read the weights from memory. These kernels do only that: each thread streams
 * its own share of the weight rows, four at a time, through one vector accumulator per row, and
 * reuses each block of rows (still in L1) for the next activation rows; int8 products of several
 * rows load each weight vector once for a tile of them (a draft's verification, whose rows would
 * otherwise be bound by those loads). Built by
 * gpt/kernels/build.py with -march=native, which picks the widest instruction set this CPU has;
 * gpt/kernels/__init__.py says why we have our own kernels at all.
 *
 * int8: x is uint8, the int8 activations shifted by 128 (what gpt.quantization's per-row
 * quantizer writes), w is int8, and y gets the exact int32 products of (x - 128) and w.
 * With VNNI (dpbusd: u8 x s8 into int32) the shifted activations go straight in, and the
 * shift comes back out as 128 * w_sum[n], the row sums the caller keeps with the weight, so a
 * weight block costs one instruction. Without VNNI (AVX2's maddubs adds pairs into int16, which
 * would saturate on shifted values), the activations are shifted back and the signs moved onto
 * them: |w| * (x * sign(w)), whose pairs stay below 2 * 128 * 127 < 32767. Exact either way.
 */
#include <math.h>
#include <stdint.h>
#include <immintrin.h>

#define ROWS 4

/* Starting a parallel region costs more than a small matrix's product: those stay on the
 * calling thread. */
#define PARALLEL_MIN (1L << 15)

/* ---- float32 ---- */
#if defined(__AVX512F__)
#define F32_LANES 16
typedef __m512 vf;
#define vf_zero() _mm512_setzero_ps()
#define vf_load(p) _mm512_loadu_ps(p)
#define vf_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
static inline float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define F32_LANES 8
typedef __m256 vf;
#define vf_zero() _mm256_setzero_ps()
#define vf_load(p) _mm256_loadu_ps(p)
#define vf_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float vf_sum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---- int8 ---- */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define I8_ISA 1
#define I8_BYTES 64
#define I8_SHIFTED 1 /* accumulates x * w with x still shifted by 128 */
typedef __m512i vi;
#define vi_zero() _mm512_setzero_si512()
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_x(v) (v)
#define vi_dot(acc, x, w) _mm512_dpbusd_epi32(acc, x, w)
#define I8_TILE 4 /* activation rows per weight block in several-row products: 16 accumulators */
static inline int32_t vi_sum(vi v) { return _mm512_reduce_add_epi32(v); }
/* The four sums at once: pairs of vectors interleaved and added, the 128-bit lanes last. */
static inline void vi_sum4(vi a0, vi a1, vi a2, vi a3, int32_t out[4]) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i *)out, q);
}
#elif defined(__AVX2__)
#define I8_BYTES 32
typedef __m256i vi;
#define vi_zero() _mm256_setzero_si256()
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define I8_TILE 2 /* 16 registers: 8 accumulators, the block's 4 weight vectors and the rest */
static inline int32_t vi_sum(vi v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}
static inline void vi_sum4(vi a0, vi a1, vi a2, vi a3, int32_t out[4]) {
    const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
    const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
    const __m256i u = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
    const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)out, q);
}
#if defined(__AVXVNNI__)
#define I8_ISA 2
#define I8_SHIFTED 1
#define vi_x(v) (v)
#define vi_dot(acc, x, w) _mm256_dpbusd_avx_epi32(acc, x, w)
#else
#define I8_ISA 3
#define I8_SHIFTED 0 /* accumulates the true products: x is shifted back first */
#define vi_x(v) _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80))
static inline vi vi_dot(vi acc, vi x, vi w) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
#endif

/* Which kernels this build has: bit 0 float32; bits 4-7 the int8 flavour (1 AVX-512 VNNI,
 * 2 AVX-VNNI, 3 AVX2). 0: none (the caller keeps PyTorch's kernels). */
int gemv_isa(void) {
    int isa = 0;
#ifdef F32_LANES
    isa |= 1;
#endif
#ifdef I8_ISA
    isa |= I8_ISA << 4;
#endif
    return isa;
}

/* One activation row against four weight rows (w, w + K, w + 2K, w + 3K), or against one: the
 * full blocks and the last few rows. Kept apart so the hot loop has nothing in it but loads
 * and multiply-adds into four named accumulators (an array of them, or row pointers chosen at
 * run time, cost register shuffles there, measurably). */
#ifdef F32_LANES
static inline void f32_rows4(const float *x, const float *w, long K, float out[4]) {
    const long kv = K - K % F32_LANES;
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < kv; k += F32_LANES) {
        const vf xv = vf_load(x + k);
        a0 = vf_fma(vf_load(w0 + k), xv, a0);
        a1 = vf_fma(vf_load(w1 + k), xv, a1);
        a2 = vf_fma(vf_load(w2 + k), xv, a2);
        a3 = vf_fma(vf_load(w3 + k), xv, a3);
    }
    float s0 = vf_sum(a0), s1 = vf_sum(a1), s2 = vf_sum(a2), s3 = vf_sum(a3);
    for (long k = kv; k < K; k++) {
        s0 += x[k] * w0[k]; s1 += x[k] * w1[k]; s2 += x[k] * w2[k]; s3 += x[k] * w3[k];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static inline float f32_row(const float *x, const float *w, long K) {
    const long kv = K - K % F32_LANES;
    vf a = vf_zero();
    for (long k = 0; k < kv; k += F32_LANES) a = vf_fma(vf_load(w + k), vf_load(x + k), a);
    float s = vf_sum(a);
    for (long k = kv; k < K; k++) s += x[k] * w[k];
    return s;
}

/* bias may be NULL. */
void gemv_f32(const float *x, const float *w, const float *bias, float *y, long M, long N, long K) {
    const long blocks = N / ROWS;
    if (M == 1) { /* the decode step of one stream: without the row loop, measurably faster */
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN)
        for (long b = 0; b < blocks; b++) {
            f32_rows4(x, w + b * ROWS * K, K, y + b * ROWS);
            if (bias)
                for (long r = 0; r < ROWS; r++) y[b * ROWS + r] += bias[b * ROWS + r];
        }
    } else {
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN)
        for (long b = 0; b < blocks; b++) {
            for (long m = 0; m < M; m++) { /* the block's rows are in L1 again for the next activation row */
                float s[ROWS];
                f32_rows4(x + m * K, w + b * ROWS * K, K, s);
                for (long r = 0; r < ROWS; r++)
                    y[m * N + b * ROWS + r] = bias ? s[r] + bias[b * ROWS + r] : s[r];
            }
        }
    }
    for (long n = blocks * ROWS; n < N; n++)
        for (long m = 0; m < M; m++)
            y[m * N + n] = f32_row(x + m * K, w + n * K, K) + (bias ? bias[n] : 0.0f);
}
#endif

#ifdef I8_ISA
/* The int8 weights are read in their own layout (i8_interleave writes it from the plain (N, K)
 * one): in each block of four rows, the rows' first I8_BYTES columns, then their next ones, and
 * so on, then the four rows' last K % I8_BYTES columns one row after the other; rows past the
 * last full block stay as they are. A block is then one sequential stream. Read as four rows
 * K bytes apart, GPT-2's rows of 768 bytes are too short for the hardware prefetcher to keep
 * up, and the products read well below the memory bandwidth. */
#define PREFETCH_AHEAD 1024 /* bytes: a little further than the prefetcher's own reach */

void i8_interleave(const int8_t *w, int8_t *out, long N, long K) {
    const long kv = K - K % I8_BYTES, tail = K - kv, blocks = N / ROWS;
    for (long b = 0; b < blocks; b++) {
        int8_t *o = out + b * ROWS * K;
        for (long k = 0; k < kv; k += I8_BYTES)
            for (long r = 0; r < ROWS; r++, o += I8_BYTES)
                for (long j = 0; j < I8_BYTES; j++) o[j] = w[(b * ROWS + r) * K + k + j];
        for (long r = 0; r < ROWS; r++, o += tail)
            for (long j = 0; j < tail; j++) o[j] = w[(b * ROWS + r) * K + kv + j];
    }
    for (long i = blocks * ROWS * K; i < N * K; i++) out[i] = w[i];
}

/* The last K % I8_BYTES columns of a block (stored row after row) added into its four sums. */
static inline void i8_tail4(const uint8_t *x, const int8_t *p, long tail, int32_t out[4]) {
    for (long j = 0; j < tail; j++) {
        const int32_t xk = (int32_t)x[j] - (I8_SHIFTED ? 0 : 128);
        out[0] += xk * p[j];
        out[1] += xk * p[tail + j];
        out[2] += xk * p[2 * tail + j];
        out[3] += xk * p[3 * tail + j];
    }
}

/* Integer sums of x against one block of four interleaved rows (i8_row: one plain row, past
 * the last block); for the VNNI flavours x is still shifted. */
static inline void i8_rows4(const uint8_t *x, const int8_t *w, long K, int32_t out[4]) {
    const long kv = K - K % I8_BYTES, tail = K - kv;
    const int8_t *p = w;
    vi a0 = vi_zero(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < kv; k += I8_BYTES, p += ROWS * I8_BYTES) {
        for (long o = 0; o < ROWS * I8_BYTES; o += 64)
            _mm_prefetch((const char *)p + PREFETCH_AHEAD + o, _MM_HINT_T0);
        const vi xv = vi_x(vi_load(x + k));
        a0 = vi_dot(a0, xv, vi_load(p));
        a1 = vi_dot(a1, xv, vi_load(p + I8_BYTES));
        a2 = vi_dot(a2, xv, vi_load(p + 2 * I8_BYTES));
        a3 = vi_dot(a3, xv, vi_load(p + 3 * I8_BYTES));
    }
    vi_sum4(a0, a1, a2, a3, out);
    i8_tail4(x + kv, p, tail, out);
}

/* Several activation rows against one block: each weight vector is loaded once for I8_TILE
 * rows of x, which a product of a few rows (a draft being verified) is bound by otherwise.
 * Integer sums, so the order they are added in leaves them as they are. */
#define I8_DOT4(a, xrow)                                                                           \
    do {                                                                                           \
        const vi xv = vi_x(vi_load((xrow) + k));                                                   \
        a##0 = vi_dot(a##0, xv, w0); a##1 = vi_dot(a##1, xv, w1);                                  \
        a##2 = vi_dot(a##2, xv, w2); a##3 = vi_dot(a##3, xv, w3);                                  \
    } while (0)

static inline void i8_tile(const uint8_t *x, const int8_t *w, long K, int32_t out[I8_TILE][ROWS]) {
    const long kv = K - K % I8_BYTES, tail = K - kv;
    const int8_t *p = w;
    vi a0 = vi_zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#if I8_TILE == 4
    vi c0 = a0, c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;
#endif
    for (long k = 0; k < kv; k += I8_BYTES, p += ROWS * I8_BYTES) {
        for (long o = 0; o < ROWS * I8_BYTES; o += 64)
            _mm_prefetch((const char *)p + PREFETCH_AHEAD + o, _MM_HINT_T0);
        const vi w0 = vi_load(p), w1 = vi_load(p + I8_BYTES), w2 = vi_load(p + 2 * I8_BYTES),
                 w3 = vi_load(p + 3 * I8_BYTES);
        I8_DOT4(a, x);
        I8_DOT4(b, x + K);
#if I8_TILE == 4
        I8_DOT4(c, x + 2 * K);
        I8_DOT4(d, x + 3 * K);
#endif
    }
    vi_sum4(a0, a1, a2, a3, out[0]);
    vi_sum4(b0, b1, b2, b3, out[1]);
#if I8_TILE == 4
    vi_sum4(c0, c1, c2, c3, out[2]);
    vi_sum4(d0, d1, d2, d3, out[3]);
#endif
    for (long m = 0; m < I8_TILE; m++) i8_tail4(x + m * K + kv, p, tail, out[m]);
}

static inline int32_t i8_row(const uint8_t *x, const int8_t *w, long K) {
    const long kv = K - K % I8_BYTES;
    vi a = vi_zero();
    for (long k = 0; k < kv; k += I8_BYTES) a = vi_dot(a, vi_x(vi_load(x + k)), vi_load(w + k));
    int32_t s = vi_sum(a);
    for (long k = kv; k < K; k++) s += ((int32_t)x[k] - (I8_SHIFTED ? 0 : 128)) * w[k];
    return s;
}

/* Where a product goes: int32 sums (yi), or float32 rescaled the way gpt.quantization rescales
 * (yf[m, n] = sum * x_scale[m] * w_scale[n], plus bias[n] with one rounding, as torch.addcmul
 * does it), so that both give the same numbers to the bit. */
typedef struct {
    int32_t *yi;
    float *yf;
    const float *x_scale, *w_scale, *bias; /* bias may be NULL */
    const int32_t *w_sum;                  /* read only by the VNNI flavours (I8_SHIFTED) */
    long N;
} i8_out;

static inline void i8_put(const i8_out *o, long m, long n, int32_t sum) {
    if (I8_SHIFTED) sum -= 128 * o->w_sum[n];
    if (o->yi) {
        o->yi[m * o->N + n] = sum;
    } else {
        const float v = (float)sum * o->x_scale[m];
        o->yf[m * o->N + n] = o->bias ? fmaf(v, o->w_scale[n], o->bias[n]) : v * o->w_scale[n];
    }
}

/* i8_put for the four outputs n..n+3 of row m at once, with the same operations (so the same
 * numbers): the scalar stores and conversions were a large share of a few rows' product. */
static inline void i8_put4(const i8_out *o, long m, long n, const int32_t sums[4]) {
    __m128i s = _mm_loadu_si128((const __m128i *)sums);
    if (I8_SHIFTED) s = _mm_sub_epi32(s, _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(o->w_sum + n)), 7));
    if (o->yi) {
        _mm_storeu_si128((__m128i *)(o->yi + m * o->N + n), s);
    } else {
        const __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(s), _mm_set1_ps(o->x_scale[m]));
        const __m128 ws = _mm_loadu_ps(o->w_scale + n);
        _mm_storeu_ps(o->yf + m * o->N + n,
                      o->bias ? _mm_fmadd_ps(v, ws, _mm_loadu_ps(o->bias + n)) : _mm_mul_ps(v, ws));
    }
}

static void i8_product(const uint8_t *x, const int8_t *w, const i8_out *o, long M, long N, long K) {
    const long blocks = N / ROWS;
    if (M == 1) {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN)
        for (long b = 0; b < blocks; b++) {
            int32_t s[ROWS];
            i8_rows4(x, w + b * ROWS * K, K, s);
            i8_put4(o, 0, b * ROWS, s);
        }
    } else {
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN)
        for (long b = 0; b < blocks; b++) {
            long m = 0; /* the block's rows are in L1 again for the next activation rows */
            for (; m + I8_TILE <= M; m += I8_TILE) {
                int32_t s[I8_TILE][ROWS];
                i8_tile(x + m * K, w + b * ROWS * K, K, s);
                for (long t = 0; t < I8_TILE; t++) i8_put4(o, m + t, b * ROWS, s[t]);
            }
            for (; m < M; m++) {
                int32_t s[ROWS];
                i8_rows4(x + m * K, w + b * ROWS * K, K, s);
                i8_put4(o, m, b * ROWS, s);
            }
        }
    }
    for (long n = blocks * ROWS; n < N; n++)
        for (long m = 0; m < M; m++) i8_put(o, m, n, i8_row(x + m * K, w + n * K, K));
}

/* w in i8_interleave's layout; w_sum[n] = sum_k w[n, k], read only by the VNNI flavours. */
void gemv_u8s8(const uint8_t *x, const int8_t *w, const int32_t *w_sum, int32_t *y, long M, long N, long K) {
    const i8_out o = {.yi = y, .w_sum = w_sum, .N = N};
    i8_product(x, w, &o, M, N, K);
}

/* gpt.quantization.quantize_rows(x, torch.uint8) in one pass per row, with the same float
 * operations (so the same numbers): scale[m] = max(max_k |x[m, k]|, 1e-12) / 127 and
 * q[m, k] = round_half_even(x[m, k] / scale[m]) + 128. */
static void quantize_row_u8(const float *x, uint8_t *q, float *scale, long K) {
    const long kv = K - K % 32;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (long k = 0; k < K - K % 8; k += 8)
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    for (long k = K - K % 8; k < K; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    const float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    *scale = s;
    const __m256 sv = _mm256_set1_ps(s);
    const __m256i shift = _mm256_set1_epi32(128), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (long k = 0; k < kv; k += 32) { /* cvtps rounds half to even, as torch.round does */
        __m256i a = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k), sv)), shift);
        __m256i b =
            _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k + 8), sv)), shift);
        __m256i c =
            _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k + 16), sv)), shift);
        __m256i d =
            _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k + 24), sv)), shift);
        __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (long k = kv; k < K; k++) q[k] = (uint8_t)(nearbyintf(x[k] / s) + 128.0f);
}

/* The whole int8 linear layer for float32 rows x (M, K): quantize each row (into xq (M, K)
 * and x_scale (M), the caller's scratch), multiply by w (i8_interleave's layout, scales w_scale
 * per output channel), rescale and add the bias into y (M, N). One call instead of the dozen
 * small tensor operations of doing the same around gemv_u8s8. */
void linear_u8s8(const float *x, const int8_t *w, const int32_t *w_sum, const float *w_scale,
                 const float *bias, float *y, uint8_t *xq, float *x_scale, long M, long N, long K) {
#pragma omp parallel for schedule(static) if (M * K >= PARALLEL_MIN)
    for (long m = 0; m < M; m++) quantize_row_u8(x + m * K, xq + m * K, x_scale + m, K);
    const i8_out o = {.yf = y, .x_scale = x_scale, .w_scale = w_scale, .bias = bias, .w_sum = w_sum, .N = N};
    i8_product(xq, w, &o, M, N, K);
}
#endif
