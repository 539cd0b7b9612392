/* The softmax's elementwise exp (core/rows.h), compiled once with its
 * AVX-512, AVX2 and baseline clones. */
#include "core/rows.h"

#include "core/fastmath.h"
#include "core/moe.h"

MOE_TARGET_CLONES_EW void moe_row_exp(float *x, int n, float mx)
{
    for (int j = 0; j < n; j++) x[j] = moe_fast_expf(x[j] - mx);
}
