/* Per-row reductions over a batch of logits (B, V), float32, contiguous: what sampling needs of
 * every decode step. PyTorch's argmax and logsumexp over the last dimension of a batch of
 * vocabularies take many times as long as its amax over the same data, since their
 * index-carrying and exp paths are not vectorised; these are one or two vectorised passes per
 * row, rows split over the threads.
 *
 * argmax_rows: the index of each row's first largest value, or of its first NaN, as torch.argmax.
 * logsumexp_rows: log(sum(exp(x))) per row, from its maximum as torch.logsumexp; -inf for a row
 * of -inf, +inf with a +inf in it, NaN with a NaN in it.
 */
#include <math.h>
#include <stdint.h>

#include "exp_nonpos.h"

/* The row's largest value, ignoring NaNs; *nan set when it has one. */
static inline float row_max(const float *x, long V, int *nan) {
    float m = -INFINITY;
    int bad = 0;
    #pragma omp simd reduction(max:m) reduction(|:bad)
    for (long i = 0; i < V; i++) {
        m = x[i] > m ? x[i] : m;
        bad |= x[i] != x[i];
    }
    *nan = bad;
    return m;
}

void argmax_rows(const float *x, int64_t *out, long B, long V) {
    #pragma omp parallel for schedule(static) if (B * V >= (1L << 16))
    for (long b = 0; b < B; b++) {
        const float *r = x + b * V;
        int nan;
        const float m = row_max(r, V, &nan);
        long i = 0;
        if (nan)
            while (r[i] == r[i]) i++;
        else
            while (i < V - 1 && r[i] != m) i++;
        out[b] = i;
    }
}

void logsumexp_rows(const float *x, float *out, long B, long V) {
    #pragma omp parallel for schedule(static) if (B * V >= (1L << 16))
    for (long b = 0; b < B; b++) {
        const float *r = x + b * V;
        int nan;
        const float m = row_max(r, V, &nan);
        if (nan || isinf(m)) {
            out[b] = nan ? NAN : m;
            continue;
        }
        /* float32 sums of short blocks, added up in double: over a whole row, near-equal small
         * terms added to one float32 sum round the same way each time, and that bias adds up
         * (4e-5 in the log over 1000 equal logits) */
        double total = 0.0;
        long i = 0;
#ifdef __AVX2__
        const __m256 mv = _mm256_set1_ps(m);
        for (; i + 256 <= V; i += 256) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (long j = i; j < i + 256; j += 16) {
                a0 = _mm256_add_ps(a0, exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(r + j), mv)));
                a1 = _mm256_add_ps(a1, exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(r + j + 8), mv)));
            }
            float lanes[8];
            _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a1));
            for (int l = 0; l < 8; l++) total += lanes[l];
        }
#endif
        for (; i < V; i++)
            total += exp_nonpos(r[i] - m);
        out[b] = m + (float)log(total);
    }
}
