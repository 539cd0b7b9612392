/* Philox4x32-10 and the uniform / normal transforms built on it. */
#include "core/rng.h"

#include <math.h>

void moe_philox(uint32_t out[4], const uint32_t ctr[4], const uint32_t key[2])
{
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)M0 * c0, p1 = (uint64_t)M1 * c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += W0;
        k1 += W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

double moe_rng_uniform(uint32_t seed, uint32_t stream, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3)
{
    uint32_t ctr[4] = {c0, c1, c2, c3}, key[2] = {seed, stream}, o[4];
    moe_philox(o, ctr, key);
    return ((double)o[0] + 0.5) * (1.0 / 4294967296.0);
}

double moe_rng_normal(uint32_t seed, uint32_t stream, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3)
{
    uint32_t ctr[4] = {c0, c1, c2, c3}, key[2] = {seed, stream}, o[4];
    moe_philox(o, ctr, key);
    double u1 = ((double)o[0] + 0.5) * (1.0 / 4294967296.0);
    double u2 = ((double)o[1] + 0.5) * (1.0 / 4294967296.0);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}
