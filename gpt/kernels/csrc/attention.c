/* The decode step's attention: one new query per (row, head) against that row's cached keys.
 *
 * PyTorch's CPU attention kernels tile queries; with one query per row they spend most of their
 * time outside the arithmetic, and read the cache well below the memory bandwidth. These loops
 * write every row's new key and value into the cache, then attend each row to positions 0..pos
 * in one pass over the keys and one over the values (softmax in between, in float32), so a row
 * never reads keys it does not attend to.
 *
 * q, k_new, v_new, out: (B, H, D), contiguous. k_cache, v_cache: D contiguous, strides s_row,
 * s_head, s_pos (in floats) between rows, heads and positions. Batch row b is cache row rows[b];
 * its new key/value go to position pos[b] and it attends to positions 0..pos[b].
 *
 * All rows write before any row reads, so several batch rows may be the same cache row at
 * consecutive positions: a speculative draft verified as that many one-token rows
 * (gpt.attention), each of which then computes exactly what decoding its token alone computes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_nonpos.h"

/* s[j] = exp(s[j] - top) for the n scores (top: their maximum); returns their sum. */
static inline float softmax_numerators(float *s, long n, float top) {
    float total = 0.0f;
    #pragma omp simd reduction(+:total)
    for (long j = 0; j < n; j++) {
        s[j] = exp_nonpos(s[j] - top);
        total += s[j];
    }
    return total;
}

void attend_one(const float *q, const float *k_new, const float *v_new, float *k_cache, float *v_cache,
                long s_row, long s_head, long s_pos, const int64_t *rows, const int64_t *pos, float *out,
                long B, long H, long D, float scale) {
    #pragma omp parallel
    {
    #pragma omp for collapse(2) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const long i = (b * H + h) * D, at = rows[b] * s_row + h * s_head + pos[b] * s_pos;
            memcpy(k_cache + at, k_new + i, D * sizeof(float));
            memcpy(v_cache + at, v_new + i, D * sizeof(float));
        }
    }
    /* the loop's end is a barrier: every key is written before any row attends */
    #pragma omp for collapse(2) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const long i = (b * H + h) * D, n = pos[b] + 1;
            const long off = rows[b] * s_row + h * s_head;
            const float *kc = k_cache + off, *vc = v_cache + off;
            const float *qq = q + i;
            float s[n], acc[D];
            float top = -INFINITY;
            for (long j = 0; j < n; j++) {
                const float *kj = kc + j * s_pos;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (long d = 0; d < D; d++)
                    dot += qq[d] * kj[d];
                s[j] = dot * scale;
                top = s[j] > top ? s[j] : top;
            }
            const float total = softmax_numerators(s, n, top);
            for (long d = 0; d < D; d++)
                acc[d] = 0.0f;
            for (long j = 0; j < n; j++) {
                const float *vj = vc + j * s_pos, w = s[j];
                #pragma omp simd
                for (long d = 0; d < D; d++)
                    acc[d] += w * vj[d];
            }
            const float inv = 1.0f / total;
            for (long d = 0; d < D; d++)
                out[i + d] = acc[d] * inv;
        }
    }
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* One (row, head) of `attend_one_f16`; inlined with D a constant where it is 64 (GPT-2's), so
 * that the compiler keeps the sums in registers. */
static inline __attribute__((always_inline)) void attend_head_f16(const float *qq, const uint16_t *kc,
                                                                  const uint16_t *vc, long s_pos, long p,
                                                                  float *out, const long D, float scale) {
    const long n = p + 1;
    float s[n];
    float top = -INFINITY;
    for (long j = 0; j < n; j++) {
        const uint16_t *kj = kc + j * s_pos;
        __m256 acc = _mm256_setzero_ps();
        for (long d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qq + d),
                                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kj + d))), acc);
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        s[j] = _mm_cvtss_f32(r) * scale;
        top = s[j] > top ? s[j] : top;
    }
    const float total = softmax_numerators(s, n, top);
    __m256 acc[32];
    for (long c = 0; c < D / 8; c++)
        acc[c] = _mm256_setzero_ps();
    for (long j = 0; j < n; j++) {
        const uint16_t *vj = vc + j * s_pos;
        const __m256 w = _mm256_set1_ps(s[j]);
        for (long c = 0; c < D / 8; c++)
            acc[c] =
                _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vj + 8 * c))), acc[c]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (long c = 0; c < D / 8; c++)
        _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inv));
}

/* The same as attend_one with a float16 cache (k_cache, v_cache hold IEEE half floats): half
 * the bytes to read, and at a batch of rows the cache is what a step reads most after the
 * weights. The new key and value are rounded to half on the way in; products and sums are
 * float32. D must be a multiple of 8, at most 256 (gpt/attention.py checks). */
void attend_one_f16(const float *q, const float *k_new, const float *v_new, uint16_t *k_cache,
                    uint16_t *v_cache, long s_row, long s_head, long s_pos, const int64_t *rows,
                    const int64_t *pos, float *out, long B, long H, long D, float scale) {
#pragma omp parallel
    {
#pragma omp for collapse(2) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const long i = (b * H + h) * D, at = rows[b] * s_row + h * s_head + pos[b] * s_pos;
            for (long d = 0; d < D; d += 8) {
                _mm_storeu_si128((__m128i *)(k_cache + at + d),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(k_new + i + d), _MM_FROUND_TO_NEAREST_INT));
                _mm_storeu_si128((__m128i *)(v_cache + at + d),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(v_new + i + d), _MM_FROUND_TO_NEAREST_INT));
            }
        }
    }
    /* the loop's end is a barrier: every key is written before any row attends */
#pragma omp for collapse(2) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const long i = (b * H + h) * D, off = rows[b] * s_row + h * s_head;
            if (D == 64)
                attend_head_f16(q + i, k_cache + off, v_cache + off, s_pos, pos[b], out + i, 64, scale);
            else
                attend_head_f16(q + i, k_cache + off, v_cache + off, s_pos, pos[b], out + i, D, scale);
        }
    }
    }
}
#endif
