/* The MoE layers of a tensor table (the table itself comes from the one
 * descriptor, src/layout). */
#include "ckpt/ckpt.h"

int moe_ckpt_moe_layers(const moe_tensor_table *t, int *layers)
{
    int n = 0, last = -1;
    /* Increasing distinct values, by repeated "smallest above last". */
    for (;;) {
        int next = -1;
        for (int i = 0; i < t->n; i++) {
            int L = t->t[i].layer;
            if (t->t[i].expert_sharded && L > last && (next < 0 || L < next)) next = L;
        }
        if (next < 0 || n == MOE_CKPT_MAX_MOE_LAYERS) return n;
        if (layers) layers[n] = next;
        n++;
        last = next;
    }
}

