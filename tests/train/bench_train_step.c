/* Throughput of one training step (not a test: prints tokens/s), single
 * process, for the default config (d 128, 4 layers, 4 heads, E 8, k 2,
 * d_ff 512, seq 128, batch 16) or the one given by --key=value options.
 * Usage: bench_train_step [STEPS] [--key=value ...] */
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "train/train.h"

int main(int argc, char **argv)
{
    moe_train_config cfg;
    moe_train_config_default(&cfg);
    int steps = 20, help = 0;
    if (argc > 1 && argv[1][0] != '-') {
        steps = atoi(argv[1]);
        argc--;
        argv++;
    }
    moe_status s = moe_train_config_parse_args(&cfg, argc - 1, argv + 1, &help);
    moe_trainer *tr = NULL;
    if (s || (s = moe_trainer_create(&tr, &cfg, NULL, moe_comm_self()))) {
        fprintf(stderr, "bench_train_step: %s: %s\n", moe_status_str(s), moe_error_detail());
        return 1;
    }
    const int B = cfg.batch_size, T = cfg.seq_len, warm = 3;
    int32_t *in = malloc((size_t)B * T * sizeof(int32_t)), *tg = malloc((size_t)B * T * sizeof(int32_t));
    double t0 = 0, fwd = 0, bwd = 0, opt = 0, loss = 0;
    for (int k = 0; k < warm + steps; k++) {
        for (int i = 0; i < B * T; i++) {
            in[i] = (int32_t)(256.0 * moe_rng_uniform(1, MOE_RNG_DATA, (uint32_t)i, (uint32_t)k, 0, 0));
            tg[i] = (int32_t)(256.0 * moe_rng_uniform(1, MOE_RNG_DATA, (uint32_t)i, (uint32_t)k, 1, 0));
        }
        if (k == warm) t0 = moe_now();
        moe_train_stats st;
        if ((s = moe_trainer_step(tr, in, tg, k, &st))) {
            fprintf(stderr, "bench_train_step: step %d: %s: %s\n", k, moe_status_str(s), moe_error_detail());
            return 1;
        }
        if (k >= warm) {
            fwd += st.t_forward;
            bwd += st.t_backward;
            opt += st.t_update + st.t_reduce;
        }
        loss = st.model.loss;
    }
    const double dt = moe_now() - t0;
    printf("%d steps of %d tokens: %.1f ms/step, %.0f tokens/s (forward %.1f, backward %.1f, "
           "optimizer %.1f ms/step), last loss %.4f, %zu parameters\n",
           steps, B * T, 1e3 * dt / steps, (double)steps * B * T / dt, 1e3 * fwd / steps,
           1e3 * bwd / steps, 1e3 * opt / steps, loss, moe_model_tensors(moe_trainer_model(tr))->total);
    free(in);
    free(tg);
    moe_trainer_destroy(tr);
    return 0;
}
