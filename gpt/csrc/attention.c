/* The decode step's attention: one new query per (row, head) against that row's cached keys.
 *
 * PyTorch's CPU attention kernels tile queries; with one query per row they spend most of their
 * time outside the arithmetic, and at a batch of 32 they read the cache at a third of the memory
 * bandwidth. This loop writes the row's new key and value into the cache and attends to
 * positions 0..pos in one pass over the keys and one over the values (softmax in between, in
 * float32), so a row never reads keys it does not attend to.
 *
 * q, k_new, v_new, out: (B, H, D), contiguous. k_cache, v_cache: D contiguous, strides s_row,
 * s_head, s_pos (in floats) between rows, heads and positions. Batch row b is cache row rows[b];
 * its new key/value go to position pos[b] and it attends to positions 0..pos[b].
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_nonpos.h"

void attend_one(const float *q, const float *k_new, const float *v_new, float *k_cache, float *v_cache,
                long s_row, long s_head, long s_pos, const int64_t *rows, const int64_t *pos, float *out,
                long B, long H, long D, float scale) {
    #pragma omp parallel for collapse(2) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long h = 0; h < H; h++) {
            const long i = (b * H + h) * D, n = pos[b] + 1;
            float *kc = k_cache + rows[b] * s_row + h * s_head, *vc = v_cache + rows[b] * s_row + h * s_head;
            memcpy(kc + pos[b] * s_pos, k_new + i, D * sizeof(float));
            memcpy(vc + pos[b] * s_pos, v_new + i, D * sizeof(float));
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
            float total = 0.0f;
            #pragma omp simd reduction(+:total)
            for (long j = 0; j < n; j++) {
                s[j] = exp_nonpos(s[j] - top);
                total += s[j];
            }
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
