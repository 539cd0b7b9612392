/* Branch-free float math that vectorises: the exp used by the activation,
 * attention-softmax and cross-entropy loops (libm's expf is a scalar call
 * that blocks vectorisation of the loop around it). */
#ifndef MOE_CORE_FASTMATH_H
#define MOE_CORE_FASTMATH_H

#include <stdint.h>
#include <string.h>

/* exp(x) for |x| <= 80 (clamped outside), Cephes expf: Cody-Waite reduction
 * by ln 2 then a degree-6 polynomial, relative error about 2 ulp. Branch-free
 * with an integer bit-cast for 2^n so that loops calling it vectorise. The
 * clamp keeps 1/(1+exp(x)) and exp(x)/(1+exp(x))^2 out of the denormal range
 * (slow on x86); it changes gelu/silu by less than 1e-33 in absolute terms.
 * exp(NaN) = NaN. */
static inline float moe_fast_expf(float x0)
{
    /* a NaN goes through the polynomial as 0 (converting NaN to an integer is
     * undefined) and comes back out as NaN, so NaN checks downstream see it */
    float x = x0 == x0 ? x0 : 0.0f;
    x = x < -80.0f ? -80.0f : x;
    x = x > 80.0f ? 80.0f : x;
    /* round(x / ln 2) by the 1.5 * 2^23 trick (rintf does not vectorise on SSE2) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x0 == x0 ? p * scale : x0;
}

#endif
