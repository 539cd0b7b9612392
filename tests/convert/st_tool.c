/* Test driver for the cross-checks with Python (st_cross.py):
 *   st_tool copy IN OUT_DIR MAX_SHARD_BYTES
 *       reads every tensor of IN (a safetensors file or a checkpoint
 *       directory) as float32 and writes them to OUT_DIR with
 *       moe_st_write_dir (in IN's name order);
 *   st_tool check IN
 *       opens IN and every shard, prints "ok N tensors" or the error;
 *   st_tool read IN
 *       opens IN, converts every tensor to float32 into fresh buffers and
 *       prints the time (bench/st_read.sh).
 * Exit status 0 on success, 1 with "st_tool: <status>: <detail>" otherwise. */
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "convert/safetensors.h"

static int fail(moe_status st)
{
    fprintf(stderr, "st_tool: %s: %s\n", moe_status_str(st), moe_error_detail());
    return 1;
}

/* A file is opened as a one-file "directory" through its own API. */
typedef struct {
    moe_st_dir *d;
    moe_st_file *f;
} source;

static moe_status src_open(source *s, const char *path)
{
    struct stat sb;
    memset(s, 0, sizeof *s);
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        moe_status st = moe_st_dir_create(&s->d, path);
        return st == MOE_OK ? moe_st_dir_check(s->d) : st;
    }
    return moe_st_file_create(&s->f, path);
}

static size_t src_count(const source *s) { return s->d ? moe_st_dir_count(s->d) : moe_st_file_count(s->f); }

static const char *src_name(const source *s, size_t i)
{
    if (s->d) return moe_st_dir_name(s->d, i);
    moe_st_view v;
    moe_st_file_get(s->f, i, &v);
    return v.name;
}

static moe_status src_view(source *s, const char *name, moe_st_view *v)
{
    if (s->d) return moe_st_dir_find(s->d, name, v);
    moe_st_file_find(s->f, name, v);
    return MOE_OK;
}

static moe_status src_read(source *s, const char *name, float *out, size_t n)
{
    return s->d ? moe_st_dir_read_f32(s->d, name, out, n) : moe_st_file_read_f32(s->f, name, out, n);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Open + convert every tensor into its own new buffer, as a model load does. */
static int read_all(const char *path)
{
    double t0 = now();
    source s;
    moe_status st = src_open(&s, path);
    if (st != MOE_OK) return fail(st);
    size_t n = src_count(&s);
    double out_bytes = 0;
    for (size_t i = 0; i < n && st == MOE_OK; i++) {
        moe_st_view v;
        const char *name = src_name(&s, i);
        if ((st = src_view(&s, name, &v)) != MOE_OK) break;
        float *buf = malloc((size_t)(v.numel ? v.numel : 1) * sizeof(float));
        if (!buf) return 1;
        st = src_read(&s, name, buf, (size_t)v.numel);
        out_bytes += 4.0 * (double)v.numel;
        free(buf);
    }
    moe_st_dir_destroy(s.d);
    moe_st_file_destroy(s.f);
    if (st != MOE_OK) return fail(st);
    double t = now() - t0;
    printf("%zu tensors, %.1f MB float32 in %.3f s: %.0f MB/s\n", n, out_bytes / 1e6, t, out_bytes / 1e6 / t);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3 || (strcmp(argv[1], "copy") && strcmp(argv[1], "check") && strcmp(argv[1], "read")) ||
        (!strcmp(argv[1], "copy") && argc != 5)) {
        fprintf(stderr, "usage: st_tool copy IN OUT_DIR MAX_SHARD_BYTES | st_tool check IN | st_tool read IN\n");
        return 2;
    }
    if (!strcmp(argv[1], "read")) return read_all(argv[2]);
    source s;
    moe_status st = src_open(&s, argv[2]);
    if (st != MOE_OK) return fail(st);
    size_t n = src_count(&s);
    if (!strcmp(argv[1], "check")) {
        printf("ok %zu tensors\n", n);
        moe_st_dir_destroy(s.d);
        moe_st_file_destroy(s.f);
        return 0;
    }
    moe_st_tensor *t = calloc(n ? n : 1, sizeof *t);
    float **bufs = calloc(n ? n : 1, sizeof *bufs);
    if (!t || !bufs) return 1;
    for (size_t i = 0; i < n && st == MOE_OK; i++) {
        moe_st_view v;
        const char *name = src_name(&s, i);
        if ((st = src_view(&s, name, &v)) != MOE_OK) break;
        bufs[i] = malloc((size_t)(v.numel ? v.numel : 1) * sizeof(float));
        if (!bufs[i]) return 1;
        st = src_read(&s, name, bufs[i], (size_t)v.numel);
        t[i].name = name;
        t[i].rank = v.rank;
        memcpy(t[i].shape, v.shape, sizeof v.shape);
        t[i].data = bufs[i];
    }
    if (st == MOE_OK) st = moe_st_write_dir(argv[3], t, n, strtoull(argv[4], NULL, 10), NULL);
    for (size_t i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(t);
    moe_st_dir_destroy(s.d);
    moe_st_file_destroy(s.f);
    return st == MOE_OK ? 0 : fail(st);
}
