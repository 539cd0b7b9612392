/* The tokenizer over MPI ranks (through src/comm only): the part-end
 * exchange of tok_parts.c, training whose piece counting is split over
 * ranks and threads, and moe_tok_encode_file, which writes one token file
 * from every rank with pwrite at offsets from a prefix sum of the parts'
 * token counts. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "comm/comm.h"
#include "tokenizer/tok_comm.h"
#include "tokenizer/tok_parts.h"
#include "tokenizer/tokfile.h"

/* ---- part-end exchange (tok_parts.h): every rank sends its parts' ends ---- */

static moe_status comm_exchange(void *xctx, const size_t *mine, size_t *all, int n_local, moe_status local)
{
    moe_comm *c = xctx;
    moe_status st = moe_comm_agree(c, local);
    if (st) return st;
    uint64_t *m = malloc(sizeof(uint64_t) * (size_t)(n_local ? n_local : 1));
    uint64_t *a = malloc(sizeof(uint64_t) * (size_t)(n_local ? n_local : 1) * (size_t)moe_comm_size(c));
    st = moe_comm_agree(c, m && a ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "part ends"));
    for (int i = 0; !st && i < n_local; i++) m[i] = mine[i];
    if (!st) st = moe_comm_allgather(c, a, m, sizeof(uint64_t) * (size_t)n_local);
    for (int i = 0; !st && i < n_local * moe_comm_size(c); i++) all[i] = (size_t)a[i];
    free(m);
    free(a);
    return st;
}

/* ---- training ---- */

moe_status moe_tok_train_comm(moe_tok **out, moe_comm *c, const char *path, int64_t vocab_size, const char *pattern,
                              int ns, const char *const *names, int threads, moe_tok_train_stats *stats)
{
    *out = NULL;
    if (threads < 1) threads = 1;
    const int W = moe_comm_size(c), r = moe_comm_rank(c);
    moe_tok_text m = {0};
    moe_tok *base = NULL;
    moe_tok_counts *counts = NULL;
    double t0 = moe_now();
    /* the 256 single bytes carry the pattern for counting */
    uint8_t bytes[256];
    int64_t off[257];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    off[256] = 256;
    moe_status st = moe_tok_create(&base, bytes, off, 256, pattern, 0, NULL, NULL);
    if (!st) st = moe_tok_text_map(&m, path);
    if (!st) st = moe_tok_counts_create(&counts);
    st = moe_comm_agree(c, st);
    int bad = 0;
    if (!st)
        st = moe_tok_counts_add_text(counts, base, m.data, m.n, moe_tok_parts_count(m.n, W, threads), r, W, threads,
                                     comm_exchange, c, &bad);
    const double t_count = moe_now() - t0;
    /* every rank gets every rank's counts (sizes, then one broadcast per rank) */
    uint8_t *blob = NULL, *other = NULL;
    size_t nb = 0;
    if (c && W > 1) {
        if (!st) st = moe_tok_counts_serialize(counts, &blob, &nb);
        st = moe_comm_agree(c, st);
        uint64_t *sizes = malloc(sizeof(uint64_t) * (size_t)W), mine = nb;
        if (!st && !sizes) st = moe_errorf(MOE_ERR_NOMEM, "sizes");
        st = moe_comm_agree(c, st);
        if (!st) st = moe_comm_allgather(c, sizes, &mine, sizeof mine);
        for (int k = 0; k < W && !st; k++) {
            if (k == r) {
                st = moe_comm_agree(c, st);
                if (!st) st = moe_comm_bcast(c, blob, nb, k);
                continue;
            }
            other = malloc(sizes[k] ? sizes[k] : 1);
            st = moe_comm_agree(c, other ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "counts of rank %d", k));
            if (!st) st = moe_comm_bcast(c, other, sizes[k], k);
            if (!st) st = moe_tok_counts_merge(counts, other, sizes[k]);
            free(other);
            other = NULL;
        }
        free(sizes);
    }
    free(blob);
    double t1 = moe_now();
    if (!st) st = moe_tok_train_from_counts(out, counts, vocab_size, moe_tok_pattern(base), ns, names);
    {
        moe_status a = moe_comm_agree(c, st);
        if (a && !st) {
            moe_tok_destroy(*out);
            *out = NULL;
        }
        st = a;
    }
    if (stats) {
        stats->bytes = m.n;
        stats->pieces = counts ? moe_tok_counts_n_pieces(counts) : 0;
        stats->count_seconds = t_count;
        stats->merge_seconds = moe_now() - t1;
        stats->bad_splits = bad;
    }
    moe_tok_counts_destroy(counts);
    moe_tok_destroy(base);
    moe_tok_text_unmap(&m);
    return st;
}

/* ---- encoding a corpus into a token file ---- */

typedef struct {
    const uint8_t *text;
    size_t n;
    moe_tok_ids *ids; /* per local part of this rank */
    int n_procs;
} enc_ctx;

static moe_status enc_run(void *ctx, int part, moe_tok_encoder *e, size_t start, size_t stop, size_t *end)
{
    enc_ctx *x = ctx;
    return moe_tok_encode_part(e, &x->ids[moe_tok_part_local(part, x->n_procs)], end, x->text, x->n, start, stop);
}

static void enc_reset(void *ctx, int part)
{
    enc_ctx *x = ctx;
    x->ids[moe_tok_part_local(part, x->n_procs)].n = 0;
}

/* Writes all of buf at off (pwrite may write less). */
static moe_status pwrite_all(int fd, const void *buf, size_t n, off_t off, const char *path)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
        p += w;
        n -= (size_t)w;
        off += w;
    }
    return MOE_OK;
}

/* Ids as little-endian uint16/uint32 written at token offset `at`. */
static moe_status write_ids(int fd, const uint32_t *ids, size_t n, uint64_t at, int bpt, const char *path)
{
    uint8_t buf[1 << 16];
    moe_status st = MOE_OK;
    size_t i = 0;
    while (i < n && !st) {
        size_t k = 0;
        for (; i < n && k + 4 <= sizeof buf; i++) {
            const uint32_t v = ids[i];
            buf[k++] = (uint8_t)v;
            buf[k++] = (uint8_t)(v >> 8);
            if (bpt == 4) {
                buf[k++] = (uint8_t)(v >> 16);
                buf[k++] = (uint8_t)(v >> 24);
            }
        }
        st = pwrite_all(fd, buf, k, (off_t)(MOE_TOK_FILE_HEADER + at * (uint64_t)bpt), path);
        at += k / (size_t)bpt;
    }
    return st;
}

moe_status moe_tok_encode_file(moe_comm *c, const moe_tok *t, const char *in_path, const char *out_path,
                               int threads, const uint8_t *delim, size_t delim_len, int64_t sep,
                               moe_tok_encode_stats *stats)
{
    if (threads < 1) threads = 1;
    const int W = moe_comm_size(c), r = moe_comm_rank(c);
    moe_tok_text m = {0};
    double t0 = moe_now();
    moe_status st = moe_tok_text_map(&m, in_path);
    st = moe_comm_agree(c, st);
    if (st) return st;
    const int P = moe_tok_parts_count(m.n, W, threads), nl = P / W;
    moe_tok_ids *ids = calloc((size_t)nl, sizeof *ids);
    size_t *splits = malloc(sizeof(size_t) * (size_t)(P + 1));
    uint64_t *counts = calloc((size_t)P, sizeof(uint64_t)), *mine = calloc((size_t)nl, sizeof(uint64_t));
    double *cpu = calloc((size_t)nl, sizeof(double)), cpu_sum = 0, cpu_max = 0;
    st = ids && splits && counts && mine && cpu ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "parts");
    st = moe_comm_agree(c, st);
    int bad = 0;
    if (!st) {
        enc_ctx x = {m.data, m.n, ids, W};
        const moe_tok_parts_ops ops = {enc_run, enc_reset, &x, comm_exchange, c};
        st = moe_tok_parts_run(t, delim, delim_len, sep, m.data, m.n, P, r, W, threads, &ops, splits, &bad, cpu);
    }
    const double t_encode = moe_now() - t0;
    double largest = 0;
    for (int i = 0; cpu && i < nl; i++) {
        cpu_sum += cpu[i];
        if (cpu[i] > largest) largest = cpu[i];
    }
    free(cpu);
    /* the longest any rank needs: its parts over its threads, at least its largest part */
    cpu_max = cpu_sum / threads > largest ? cpu_sum / threads : largest;
    if (!st && c) st = moe_comm_allreduce_f64(c, MOE_SCOPE_WORLD, &cpu_sum, 1);
    if (!st && c) st = moe_comm_allmax_f64(c, MOE_SCOPE_WORLD, &cpu_max, 1);
    /* token offsets: an exclusive prefix sum over all parts in text order */
    for (int i = 0; !st && i < nl; i++) mine[i] = ids[i].n;
    if (!st && c) {
        uint64_t *packed = malloc(sizeof(uint64_t) * (size_t)P);
        st = moe_comm_agree(c, packed ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "counts"));
        if (!st) st = moe_comm_allgather(c, packed, mine, sizeof(uint64_t) * (size_t)nl);
        for (int q = 0; !st && q < W; q++)
            for (int i = 0; i < nl; i++) counts[i * W + q] = packed[q * nl + i];
        free(packed);
    } else if (!st) {
        memcpy(counts, mine, sizeof(uint64_t) * (size_t)P);
    }
    uint64_t total = 0;
    uint64_t *before = calloc((size_t)(P ? P : 1), sizeof(uint64_t));
    if (!before && !st) st = moe_errorf(MOE_ERR_NOMEM, "offsets");
    st = moe_comm_agree(c, st);
    for (int k = 0; !st && k < P; k++) {
        before[k] = total;
        total += counts[k];
    }
    const moe_tok_file_header h = moe_tok_file_header_for(t, total);
    const int bpt = (int)h.bytes_per_token;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", out_path);
    int fd = -1;
    double t1 = moe_now();
    /* st is the same on every rank here; each step below is agreed */
    if (!st) {
        /* rank 0 creates the file at its full size, then every rank writes its parts */
        if (r == 0) {
            fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd < 0) st = moe_errorf(MOE_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
            else if (ftruncate(fd, (off_t)(MOE_TOK_FILE_HEADER + total * (uint64_t)bpt)))
                st = moe_errorf(MOE_ERR_IO, "cannot size %s: %s", tmp, strerror(errno));
        }
        st = moe_comm_agree(c, st);
        if (!st && r != 0) {
            fd = open(tmp, O_WRONLY);
            if (fd < 0) st = moe_errorf(MOE_ERR_IO, "cannot open %s: %s", tmp, strerror(errno));
        }
        for (int i = 0; !st && i < nl; i++) st = write_ids(fd, ids[i].ids, ids[i].n, before[i * W + r], bpt, tmp);
        if (!st && fsync(fd)) st = moe_errorf(MOE_ERR_IO, "cannot sync %s: %s", tmp, strerror(errno));
        st = moe_comm_agree(c, st);
        if (!st && r == 0) {
            uint8_t hdr[MOE_TOK_FILE_HEADER];
            moe_tok_file_header_pack(hdr, &h);
            st = pwrite_all(fd, hdr, sizeof hdr, 0, tmp);
            if (!st && fsync(fd)) st = moe_errorf(MOE_ERR_IO, "cannot sync %s: %s", tmp, strerror(errno));
            if (!st && rename(tmp, out_path))
                st = moe_errorf(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, out_path, strerror(errno));
        }
        if (fd >= 0) close(fd);
        st = moe_comm_agree(c, st);
        if (st && r == 0) unlink(tmp);
    }
    if (stats) {
        stats->bytes = m.n;
        stats->tokens = total;
        stats->encode_seconds = t_encode;
        stats->write_seconds = moe_now() - t1;
        stats->bad_splits = bad;
        stats->parts = P;
        stats->cpu_sum = cpu_sum;
        stats->split_bound = cpu_max > 0 ? cpu_sum / cpu_max : 1.0;
    }
    for (int i = 0; ids && i < nl; i++) moe_tok_ids_free(&ids[i]);
    free(ids);
    free(before);
    free(splits);
    free(counts);
    free(mine);
    moe_tok_text_unmap(&m);
    return st;
}
