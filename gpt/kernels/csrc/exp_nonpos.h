/* Shared by the kernels that take a softmax (attention.c, rows.c). */
#ifndef GPT_EXP_NONPOS_H
#define GPT_EXP_NONPOS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (scores minus their maximum), in a form the compiler vectorises: 2^n times a
 * degree-6 polynomial on |r| <= ln2/2, relative error about 2e-7. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    float p =
        1.0f +
        r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
