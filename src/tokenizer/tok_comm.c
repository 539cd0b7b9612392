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
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "comm/comm.h"
#include "tokenizer/tok_comm.h"
#include "tokenizer/tok_parts.h"
#include "tokenizer/tokfile.h"

/* ---- part-end exchange: every rank owns `threads` consecutive parts ---- */

static moe_status comm_exchange(void *xctx, size_t *ends, int n_parts, int p0, int p1, moe_status local)
{
    moe_comm *c = xctx;
    moe_status st = moe_comm_agree(c, local);
    if (st) return st;
    const int per = p1 - p0, W = moe_comm_size(c);
    if (per * W != n_parts) return moe_errorf(MOE_ERR_ARG, "%d parts over %d ranks of %d", n_parts, W, per);
    uint64_t *mine = malloc(sizeof(uint64_t) * (size_t)(per ? per : 1));
    uint64_t *all = malloc(sizeof(uint64_t) * (size_t)(n_parts ? n_parts : 1));
    st = mine && all ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "part ends");
    st = moe_comm_agree(c, st);
    for (int i = 0; !st && i < per; i++) mine[i] = ends[p0 + i];
    if (!st) st = moe_comm_allgather(c, all, mine, sizeof(uint64_t) * (size_t)per);
    for (int k = 0; !st && k < n_parts; k++) ends[k] = (size_t)all[k];
    free(mine);
    free(all);
    return st;
}

/* ---- input mapping ---- */

typedef struct {
    uint8_t *data;
    size_t n;
} mapped;

static moe_status map_input(mapped *m, const char *path)
{
    m->data = NULL;
    m->n = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "%s is not a regular file", path);
    }
    m->n = (size_t)sb.st_size;
    if (m->n) {
        void *p = mmap(NULL, m->n, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            close(fd);
            return moe_errorf(MOE_ERR_IO, "cannot map %s: %s", path, strerror(errno));
        }
        m->data = p;
    }
    close(fd);
    return MOE_OK;
}

static void unmap_input(mapped *m)
{
    if (m->data) munmap(m->data, m->n);
    m->data = NULL;
}

/* ---- training ---- */

moe_status moe_tok_train_comm(moe_tok **out, moe_comm *c, const char *path, int64_t vocab_size, const char *pattern,
                              int ns, const char *const *names, int threads, moe_tok_train_stats *stats)
{
    *out = NULL;
    if (threads < 1) threads = 1;
    const int W = c ? moe_comm_size(c) : 1, r = c ? moe_comm_rank(c) : 0;
    mapped m = {0};
    moe_tok *base = NULL;
    moe_tok_counts *counts = NULL;
    double t0 = moe_now();
    /* the 256 single bytes carry the pattern for counting */
    uint8_t bytes[256];
    int64_t off[257];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    off[256] = 256;
    moe_status st = moe_tok_create(&base, bytes, off, 256, pattern, 0, NULL, NULL);
    if (!st) st = map_input(&m, path);
    if (!st) st = moe_tok_counts_create(&counts);
    if (c) st = moe_comm_agree(c, st);
    int bad = 0;
    if (!st)
        st = moe_tok_counts_add_text(counts, base, m.data, m.n, W * threads, r * threads, (r + 1) * threads,
                                     c ? comm_exchange : NULL, c, &bad);
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
    if (c) {
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
    unmap_input(&m);
    return st;
}

/* ---- encoding a corpus into a token file ---- */

typedef struct {
    const uint8_t *text;
    size_t n;
    moe_tok_ids *ids; /* per part of this rank */
    int p0;
} enc_ctx;

static moe_status enc_run(void *ctx, int part, moe_tok_encoder *e, size_t start, size_t stop, size_t *end)
{
    enc_ctx *x = ctx;
    return moe_tok_encode_part(e, &x->ids[part - x->p0], end, x->text, x->n, start, stop);
}

static void enc_reset(void *ctx, int part)
{
    enc_ctx *x = ctx;
    x->ids[part - x->p0].n = 0;
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
    const int W = c ? moe_comm_size(c) : 1, r = c ? moe_comm_rank(c) : 0, P = W * threads;
    const int p0 = r * threads, p1 = p0 + threads;
    mapped m = {0};
    double t0 = moe_now();
    moe_status st = map_input(&m, in_path);
    if (c) st = moe_comm_agree(c, st);
    if (st) return st;
    moe_tok_ids *ids = calloc((size_t)threads, sizeof *ids);
    size_t *splits = malloc(sizeof(size_t) * (size_t)(P + 1));
    uint64_t *counts = calloc((size_t)P, sizeof(uint64_t)), *mine = calloc((size_t)threads, sizeof(uint64_t));
    st = ids && splits && counts && mine ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "parts");
    if (c) st = moe_comm_agree(c, st);
    int bad = 0;
    double *cpu = calloc((size_t)threads, sizeof(double)), cpu_sum = 0, cpu_max = 0;
    if (!st) {
        enc_ctx x = {m.data, m.n, ids, p0};
        const moe_tok_parts_ops ops = {enc_run, enc_reset, &x, c ? comm_exchange : NULL, c};
        st = moe_tok_parts_run(t, delim, delim_len, sep, m.data, m.n, P, p0, p1, &ops, splits, &bad, cpu);
    }
    const double t_encode = moe_now() - t0;
    for (int i = 0; cpu && i < threads; i++) {
        cpu_sum += cpu[i];
        if (cpu[i] > cpu_max) cpu_max = cpu[i];
    }
    free(cpu);
    if (!st && c) st = moe_comm_allreduce_f64(c, MOE_SCOPE_WORLD, &cpu_sum, 1);
    if (!st && c) st = moe_comm_allmax_f64(c, MOE_SCOPE_WORLD, &cpu_max, 1);
    /* token offsets: an exclusive prefix sum over the parts in order */
    for (int i = 0; !st && i < threads; i++) mine[i] = ids[i].n;
    if (!st && c) st = moe_comm_allgather(c, counts, mine, sizeof(uint64_t) * (size_t)threads);
    else if (!st) memcpy(counts, mine, sizeof(uint64_t) * (size_t)threads);
    uint64_t total = 0, before = 0;
    for (int k = 0; !st && k < P; k++) {
        if (k == p0) before = total;
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
        if (c) st = moe_comm_agree(c, st);
        if (!st && r != 0) {
            fd = open(tmp, O_WRONLY);
            if (fd < 0) st = moe_errorf(MOE_ERR_IO, "cannot open %s: %s", tmp, strerror(errno));
        }
        uint64_t at = before;
        for (int i = 0; !st && i < threads; i++) {
            st = write_ids(fd, ids[i].ids, ids[i].n, at, bpt, tmp);
            at += ids[i].n;
        }
        if (!st && fsync(fd)) st = moe_errorf(MOE_ERR_IO, "cannot sync %s: %s", tmp, strerror(errno));
        if (c) st = moe_comm_agree(c, st);
        if (!st && r == 0) {
            uint8_t hdr[MOE_TOK_FILE_HEADER];
            moe_tok_file_header_pack(hdr, &h);
            st = pwrite_all(fd, hdr, sizeof hdr, 0, tmp);
            if (!st && fsync(fd)) st = moe_errorf(MOE_ERR_IO, "cannot sync %s: %s", tmp, strerror(errno));
            if (!st && rename(tmp, out_path))
                st = moe_errorf(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, out_path, strerror(errno));
        }
        if (fd >= 0) close(fd);
        if (c) st = moe_comm_agree(c, st);
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
        stats->cpu_max = cpu_max;
    }
    for (int i = 0; ids && i < threads; i++) moe_tok_ids_free(&ids[i]);
    free(ids);
    free(splits);
    free(counts);
    free(mine);
    unmap_input(&m);
    return st;
}
