/* Training plots: reads a run's metrics.jsonl and draws, with gnuplot, the
 * training / validation loss and the expert load share of every MoE layer
 * over time into out_dir/training.png (data tables beside it as .tsv). */
#ifndef MOE_CLI_PLOT_H
#define MOE_CLI_PLOT_H

/* Returns 0 on success, -1 if the metrics cannot be read or gnuplot fails. */
int moe_plot_training(const char *metrics_path, const char *out_dir);

#endif
