/* Token files (tokfile.h): header packing and checks, the validating
 * mmap reader and a single-process writer. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tokenizer/tokfile.h"

static const char magic[8] = {'M', 'O', 'E', 'T', 'O', 'K', '0', '1'};

struct moe_tok_file {
    uint8_t *map;
    size_t map_len;
    const uint8_t *ids;
    int bpt;
    moe_tok_file_header h;
};

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

moe_tok_file_header moe_tok_file_header_for(const moe_tok *t, uint64_t n_tokens)
{
    moe_tok_file_header h = {0};
    h.version = MOE_TOK_FILE_VERSION;
    h.vocab_size = (uint32_t)moe_tok_vocab_size(t);
    h.bytes_per_token = h.vocab_size <= 65536 ? 2 : 4;
    h.n_tokens = n_tokens;
    h.tokenizer_hash = moe_tok_hash(t);
    return h;
}

void moe_tok_file_header_pack(uint8_t out[MOE_TOK_FILE_HEADER], const moe_tok_file_header *h)
{
    memset(out, 0, MOE_TOK_FILE_HEADER);
    memcpy(out, magic, 8);
    put32(out + 8, h->version);
    put32(out + 12, h->bytes_per_token);
    put64(out + 16, h->n_tokens);
    put32(out + 24, h->vocab_size);
    put32(out + 28, h->flags);
    put64(out + 32, h->tokenizer_hash);
}

moe_status moe_tok_file_header_unpack(moe_tok_file_header *h, const uint8_t in[MOE_TOK_FILE_HEADER], const char *path)
{
    if (memcmp(in, magic, 8)) return moe_errorf(MOE_ERR_FORMAT, "%s is not a token file (magic is not MOETOK01)", path);
    h->version = get32(in + 8);
    h->bytes_per_token = get32(in + 12);
    h->n_tokens = get64(in + 16);
    h->vocab_size = get32(in + 24);
    h->flags = get32(in + 28);
    h->tokenizer_hash = get64(in + 32);
    if (h->version != MOE_TOK_FILE_VERSION)
        return moe_errorf(MOE_ERR_FORMAT, "%s: token file version %u (this build reads version %d)", path, h->version,
                          MOE_TOK_FILE_VERSION);
    if (h->vocab_size == 0) return moe_errorf(MOE_ERR_FORMAT, "%s: vocab_size is 0", path);
    const uint32_t want = h->vocab_size <= 65536 ? 2 : 4;
    if (h->bytes_per_token != want)
        return moe_errorf(MOE_ERR_FORMAT, "%s: bytes_per_token %u for vocab_size %u (expected %u)", path,
                          h->bytes_per_token, h->vocab_size, want);
    if (h->flags) return moe_errorf(MOE_ERR_FORMAT, "%s: unknown flags 0x%x", path, h->flags);
    for (int i = 40; i < MOE_TOK_FILE_HEADER; i++)
        if (in[i]) return moe_errorf(MOE_ERR_FORMAT, "%s: header padding byte %d is not zero", path, i);
    return MOE_OK;
}

moe_status moe_tok_file_open(moe_tok_file **out, const char *path, const moe_tok *t)
{
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open token file %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "token file %s is not a regular file", path);
    }
    const size_t size = (size_t)sb.st_size;
    if (size < MOE_TOK_FILE_HEADER) {
        close(fd);
        return moe_errorf(MOE_ERR_FORMAT, "%s: truncated: %zu bytes, less than the 64-byte header", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return moe_errorf(MOE_ERR_IO, "cannot map token file %s: %s", path, strerror(errno));
    moe_tok_file *f = calloc(1, sizeof *f);
    if (!f) {
        munmap(map, size);
        return moe_errorf(MOE_ERR_NOMEM, "token file handle");
    }
    f->map = map;
    f->map_len = size;
    moe_status st = moe_tok_file_header_unpack(&f->h, map, path);
    if (!st) {
        f->bpt = (int)f->h.bytes_per_token;
        f->ids = f->map + MOE_TOK_FILE_HEADER;
        const uint64_t body = (uint64_t)(size - MOE_TOK_FILE_HEADER);
        if (f->h.n_tokens > body / (uint64_t)f->bpt)
            st = moe_errorf(MOE_ERR_FORMAT, "%s: truncated: the header says %llu tokens (%llu bytes), the file has %llu",
                            path, (unsigned long long)f->h.n_tokens,
                            (unsigned long long)(f->h.n_tokens * (uint64_t)f->bpt + MOE_TOK_FILE_HEADER),
                            (unsigned long long)size);
        else if (f->h.n_tokens * (uint64_t)f->bpt != body)
            st = moe_errorf(MOE_ERR_FORMAT, "%s: %llu trailing bytes after %llu tokens", path,
                            (unsigned long long)(body - f->h.n_tokens * (uint64_t)f->bpt),
                            (unsigned long long)f->h.n_tokens);
    }
    if (!st && t) {
        if ((int64_t)f->h.vocab_size != moe_tok_vocab_size(t))
            st = moe_errorf(MOE_ERR_MISMATCH, "%s was encoded with another tokenizer (vocab_size %u, this tokenizer %lld)",
                            path, f->h.vocab_size, (long long)moe_tok_vocab_size(t));
        else if (f->h.tokenizer_hash != moe_tok_hash(t))
            st = moe_errorf(MOE_ERR_MISMATCH,
                            "%s was encoded with another tokenizer (hash %016llx, this tokenizer %016llx)", path,
                            (unsigned long long)f->h.tokenizer_hash, (unsigned long long)moe_tok_hash(t));
    }
    if (!st && f->h.vocab_size < (f->bpt == 2 ? 65536u : UINT32_MAX)) {
        const uint32_t v = f->h.vocab_size;
        const uint64_t n = f->h.n_tokens;
        uint64_t bad = n;
        if (f->bpt == 2) {
            const uint8_t *p = f->ids;
            for (uint64_t i = 0; i < n; i++)
                if (((uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8) >= v) {
                    bad = i;
                    break;
                }
        } else {
            for (uint64_t i = 0; i < n; i++)
                if (get32(f->ids + 4 * i) >= v) {
                    bad = i;
                    break;
                }
        }
        if (bad < n)
            st = moe_errorf(MOE_ERR_FORMAT, "%s: token %llu has id %u, not below vocab_size %u", path,
                            (unsigned long long)bad, moe_tok_file_get(f, (int64_t)bad), v);
    }
    if (st) {
        moe_tok_file_close(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

void moe_tok_file_close(moe_tok_file *f)
{
    if (!f) return;
    munmap(f->map, f->map_len);
    free(f);
}

int64_t moe_tok_file_n_tokens(const moe_tok_file *f) { return (int64_t)f->h.n_tokens; }
uint32_t moe_tok_file_vocab_size(const moe_tok_file *f) { return f->h.vocab_size; }
int moe_tok_file_bytes_per_token(const moe_tok_file *f) { return f->bpt; }
uint64_t moe_tok_file_hash(const moe_tok_file *f) { return f->h.tokenizer_hash; }
const void *moe_tok_file_ids(const moe_tok_file *f) { return f->ids; }

uint32_t moe_tok_file_get(const moe_tok_file *f, int64_t i)
{
    const uint8_t *p = f->ids + (size_t)i * (size_t)f->bpt;
    return f->bpt == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : get32(p);
}

moe_status moe_tok_file_read(const moe_tok_file *f, uint32_t *out, int64_t start, int64_t n)
{
    if (start < 0 || n < 0 || (uint64_t)start > f->h.n_tokens || (uint64_t)n > f->h.n_tokens - (uint64_t)start)
        return moe_errorf(MOE_ERR_ARG, "token range [%lld, %lld) outside the file's %llu tokens", (long long)start,
                          (long long)(start + n), (unsigned long long)f->h.n_tokens);
    for (int64_t i = 0; i < n; i++) out[i] = moe_tok_file_get(f, start + i);
    return MOE_OK;
}

moe_status moe_tok_file_write(const char *path, const moe_tok *t, const uint32_t *ids, size_t n)
{
    moe_tok_file_header h = moe_tok_file_header_for(t, n);
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= h.vocab_size)
            return moe_errorf(MOE_ERR_ARG, "id %u at position %zu is not below vocab_size %u", ids[i], i, h.vocab_size);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    uint8_t hdr[MOE_TOK_FILE_HEADER];
    moe_tok_file_header_pack(hdr, &h);
    int bad = fwrite(hdr, 1, sizeof hdr, f) != sizeof hdr;
    uint8_t buf[8192];
    size_t w = 0;
    for (size_t i = 0; i < n && !bad; i++) {
        if (h.bytes_per_token == 2) {
            buf[w++] = (uint8_t)ids[i];
            buf[w++] = (uint8_t)(ids[i] >> 8);
        } else {
            put32(buf + w, ids[i]);
            w += 4;
        }
        if (w == sizeof buf) {
            bad = fwrite(buf, 1, w, f) != w;
            w = 0;
        }
    }
    if (!bad && w) bad = fwrite(buf, 1, w, f) != w;
    bad |= fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return moe_errorf(MOE_ERR_IO, "cannot write token file %s: %s", path, strerror(e));
    }
    return MOE_OK;
}
