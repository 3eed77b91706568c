/* GPT-2's GELU (the tanh approximation) and its derivative, float32, contiguous, in one pass
 * each. With 0.5 (1 + tanh(z)) = sigmoid(2z):
 *
 *   gelu(x)  = x s,                      s = sigmoid(t), t = K (x + C x^3), K = 2 sqrt(2/pi)
 *   gelu'(x) = s + x s (1 - s) K (1 + 3 C x^2)
 *
 * and sigmoid(t) = 1 / (1 + e) for t >= 0, e / (1 + e) below, with e = exp(-|t|) <= 1, which is
 * exp_nonpos's range. PyTorch's CPU kernel evaluates tanh, whose vectorised form costs several
 * times this; a training step runs GELU over every position's feed-forward activations, forward
 * and backward (gpt/activations.py).
 */
#include <math.h>

#include "exp_nonpos.h"

#define K_ 1.5957691216057308f
#define C_ 0.044715f
#define BLOCK 4096 /* elements per task: enough to pay for a thread's start, small enough to share */

static inline float sigmoid1(float t) {
    const float e = exp_nonpos(-fabsf(t));
    const float r = 1.0f / (1.0f + e);
    return t >= 0.0f ? r : e * r;
}

#ifdef __AVX2__
static inline __m256 sigmoid8(__m256 t) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 e = exp_nonpos8(_mm256_or_ps(t, sign)); /* exp(-|t|) */
    const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    const __m256 neg = _mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), neg);
}

static inline __m256 twice_z8(__m256 x) { /* K (x + C x^3) = x (K + K C x^2) */
    const __m256 x2 = _mm256_mul_ps(x, x);
    return _mm256_mul_ps(x, _mm256_fmadd_ps(x2, _mm256_set1_ps(K_ * C_), _mm256_set1_ps(K_)));
}
#endif

static void fwd_block(const float *x, float *y, long n) {
    long i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(v, sigmoid8(twice_z8(v))));
    }
#endif
    for (; i < n; i++) {
        const float v = x[i];
        y[i] = v * sigmoid1(v * (K_ + K_ * C_ * v * v));
    }
}

static void bwd_block(const float *g, const float *x, float *dx, long n) {
    long i = 0;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 s = sigmoid8(twice_z8(v));
        const __m256 x2 = _mm256_mul_ps(v, v);
        /* x 2z' = x K (1 + 3 C x^2) */
        const __m256 xdz =
            _mm256_mul_ps(v, _mm256_fmadd_ps(x2, _mm256_set1_ps(3.0f * K_ * C_), _mm256_set1_ps(K_)));
        /* s (1 + x 2z' (1 - s)) */
        const __m256 d = _mm256_mul_ps(s, _mm256_fmadd_ps(xdz, _mm256_sub_ps(one, s), one));
        _mm256_storeu_ps(dx + i, _mm256_mul_ps(d, _mm256_loadu_ps(g + i)));
    }
#endif
    for (; i < n; i++) {
        const float v = x[i];
        const float s = sigmoid1(v * (K_ + K_ * C_ * v * v));
        const float xdz = v * (K_ + 3.0f * K_ * C_ * v * v);
        dx[i] = g[i] * s * (1.0f + xdz * (1.0f - s));
    }
}

void gelu_tanh_fwd(const float *x, float *y, long n) {
    const long blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static) if (n >= 8 * BLOCK)
    for (long b = 0; b < blocks; b++) {
        const long lo = b * BLOCK, len = (lo + BLOCK <= n ? BLOCK : n - lo);
        fwd_block(x + lo, y + lo, len);
    }
}

void gelu_tanh_bwd(const float *g, const float *x, float *dx, long n) {
    const long blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static) if (n >= 8 * BLOCK)
    for (long b = 0; b < blocks; b++) {
        const long lo = b * BLOCK, len = (lo + BLOCK <= n ? BLOCK : n - lo);
        bwd_block(g + lo, x + lo, dx + lo, len);
    }
}
