/* Training plots through gnuplot (see plot.h). */
#include "cli/plot.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe_plot_training(const char *metrics_path, const char *out_dir)
{
    FILE *in = fopen(metrics_path, "r");
    if (!in) return -1;
    char loss_path[1100], load_path[1100], script_path[1100], png_path[1100];
    snprintf(loss_path, sizeof loss_path, "%s/loss.tsv", out_dir);
    snprintf(load_path, sizeof load_path, "%s/expert_load.tsv", out_dir);
    snprintf(script_path, sizeof script_path, "%s/training.gp", out_dir);
    snprintf(png_path, sizeof png_path, "%s/training.png", out_dir);
    FILE *loss = fopen(loss_path, "w"), *load = fopen(load_path, "w");
    if (!loss || !load) {
        if (loss) fclose(loss);
        if (load) fclose(load);
        fclose(in);
        return -1;
    }
    fprintf(loss, "# step\ttrain_loss\tval_loss\n");
    fprintf(load, "# step\tlayer_block\tshare of expert 0..E-1 (kept assignments / all kept)\n");
    int n_layers = 0, n_experts = 0, blocks[64];
    size_t cap = 1 << 16;
    char *line = malloc(cap);
    while (line && fgets(line, (int)cap, in)) {
        cJSON *j = cJSON_Parse(line);
        if (!j) continue;
        double step = cJSON_GetNumberValue(cJSON_GetObjectItem(j, "step"));
        cJSON *v = cJSON_GetObjectItem(j, "val_loss");
        fprintf(loss, "%g\t%g\t", step, cJSON_GetNumberValue(cJSON_GetObjectItem(j, "ce")));
        if (v) fprintf(loss, "%g\n", cJSON_GetNumberValue(v));
        else fprintf(loss, "NaN\n");
        cJSON *layers = cJSON_GetObjectItem(j, "layers");
        int l = 0;
        cJSON *layer;
        cJSON_ArrayForEach(layer, layers)
        {
            cJSON *kept = cJSON_GetObjectItem(layer, "kept");
            double sum = 0;
            cJSON *k;
            cJSON_ArrayForEach(k, kept) sum += cJSON_GetNumberValue(k);
            if (l < 64) blocks[l] = (int)cJSON_GetNumberValue(cJSON_GetObjectItem(layer, "block"));
            n_experts = cJSON_GetArraySize(kept);
            fprintf(load, "%g\t%d", step, l);
            cJSON_ArrayForEach(k, kept) fprintf(load, "\t%g", sum > 0 ? cJSON_GetNumberValue(k) / sum : 0);
            fprintf(load, "\n");
            l++;
        }
        n_layers = l > n_layers ? l : n_layers;
        cJSON_Delete(j);
    }
    free(line);
    fclose(in);
    fclose(loss);
    fclose(load);
    if (n_layers > 64) n_layers = 64;

    FILE *gp = fopen(script_path, "w");
    if (!gp) return -1;
    int panels = 1 + n_layers;
    fprintf(gp, "set terminal pngcairo size 900,%d font ',9'\nset output '%s'\n", 260 * panels, png_path);
    fprintf(gp, "set multiplot layout %d,1\nset key outside right\nset grid\nset datafile missing 'NaN'\n", panels);
    fprintf(gp, "set title 'loss (nats/byte)'\nset xlabel 'step'\n"
                "plot '%s' using 1:2 with lines title 'train', '' using 1:3 with linespoints pt 7 ps 0.6 title 'validation'\n",
            loss_path);
    for (int l = 0; l < n_layers; l++) {
        fprintf(gp, "set title 'expert load share, MoE block %d'\nset yrange [0:*]\n", blocks[l]);
        fprintf(gp, "plot for [e=0:%d] '%s' using 1:(column(2)==%d ? column(e+3) : NaN) with lines title sprintf('expert %%d', e)\n",
                n_experts - 1, load_path, l);
    }
    fprintf(gp, "unset multiplot\n");
    fclose(gp);
    char cmd[1300];
    snprintf(cmd, sizeof cmd, "gnuplot '%s' 2>/dev/null", script_path);
    return system(cmd) == 0 ? 0 : -1;
}
