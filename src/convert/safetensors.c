/* Safetensors reader (validation of the header, mmap'd views, float32
 * conversion), sharded-directory reader and atomic float32 writer. The
 * validation rules follow the reference implementation (huggingface/
 * safetensors, safetensors/src/tensor.rs) plus the format notes of its
 * README; where this reader is stricter, docs/convert.md says so. */
#define _GNU_SOURCE
#include "convert/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/strbuf.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "the safetensors writer stores float32 as they lie in memory (little-endian hosts only)");

/* ---- dtypes ---- */

static const struct {
    const char *name;
    int bits;
} dtypes[MOE_ST_DTYPE_COUNT] = {
    [MOE_ST_BOOL] = {"BOOL", 8},       [MOE_ST_U8] = {"U8", 8},
    [MOE_ST_I8] = {"I8", 8},           [MOE_ST_I16] = {"I16", 16},
    [MOE_ST_U16] = {"U16", 16},        [MOE_ST_I32] = {"I32", 32},
    [MOE_ST_U32] = {"U32", 32},        [MOE_ST_I64] = {"I64", 64},
    [MOE_ST_U64] = {"U64", 64},        [MOE_ST_F16] = {"F16", 16},
    [MOE_ST_BF16] = {"BF16", 16},      [MOE_ST_F32] = {"F32", 32},
    [MOE_ST_F64] = {"F64", 64},        [MOE_ST_C64] = {"C64", 64},
    [MOE_ST_F8_E5M2] = {"F8_E5M2", 8}, [MOE_ST_F8_E4M3] = {"F8_E4M3", 8},
    [MOE_ST_F8_E8M0] = {"F8_E8M0", 8}, [MOE_ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [MOE_ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [MOE_ST_F4] = {"F4", 4},           [MOE_ST_F6_E2M3] = {"F6_E2M3", 6},
    [MOE_ST_F6_E3M2] = {"F6_E3M2", 6},
};

const char *moe_st_dtype_str(moe_st_dtype t)
{
    return (int)t >= 0 && t < MOE_ST_DTYPE_COUNT ? dtypes[t].name : "?";
}

int moe_st_dtype_bits(moe_st_dtype t) { return (int)t >= 0 && t < MOE_ST_DTYPE_COUNT ? dtypes[t].bits : 0; }

static int dtype_parse(const char *s, moe_st_dtype *out)
{
    for (int i = 0; i < MOE_ST_DTYPE_COUNT; i++)
        if (!strcmp(s, dtypes[i].name)) {
            *out = (moe_st_dtype)i;
            return 1;
        }
    return 0;
}

/* ---- error text ---- */

/* Tensor names come from the file: quote at most 80 bytes, escape the rest. */
static const char *shown(char buf[128], const char *s)
{
    size_t o = 0;
    for (size_t i = 0; s && s[i] && o < 100; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i == 80) {
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        if (c < 0x20 || c == 0x7f) o += (size_t)snprintf(buf + o, 8, "\\x%02x", c);
        else buf[o++] = (char)c;
    }
    buf[o] = '\0';
    return buf;
}

/* A format error naming the file: FMT_ERR(f, "fmt", args...). */
#define FMT_ERR(f, fmt, ...) moe_errorf(MOE_ERR_FORMAT, "safetensors '%s': " fmt, (f)->path, ##__VA_ARGS__)

/* ---- header text checks cJSON does not make ---- */

/* 1 if s[0..n) is valid UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        int len;
        unsigned min, cp;
        if ((c & 0xe0) == 0xc0) { len = 2; min = 0x80; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { len = 3; min = 0x800; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { len = 4; min = 0x10000; cp = c & 0x07; }
        else return 0;
        if (n - i < (size_t)len) return 0;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += (size_t)len;
    }
    return 1;
}

/* cJSON decodes "\u0000" into a NUL that would silently cut a key; such a
 * header is rejected. Walks the strings of the JSON text. */
static int has_escaped_nul(const char *s, size_t n)
{
    int in = 0;
    for (size_t i = 0; i < n; i++) {
        if (!in) {
            if (s[i] == '"') in = 1;
            continue;
        }
        if (s[i] == '"') in = 0;
        else if (s[i] == '\\' && i + 1 < n) {
            if (s[i + 1] == 'u' && i + 5 < n && !strncmp(s + i + 2, "0000", 4)) return 1;
            i++; /* skip the escaped character */
        }
    }
    return 0;
}

/* A non-negative JSON integer below 2^53 (exact in a double). */
static int json_uint(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j)) return 0;
    double v = j->valuedouble;
    if (!isfinite(v) || v < 0 || v != floor(v) || v > 9007199254740992.0) return 0;
    *out = (uint64_t)v;
    return 1;
}

/* ---- one file ---- */

typedef struct {
    char *name;
    moe_st_dtype dtype;
    int rank;
    int64_t shape[MOE_ST_MAX_RANK];
    int64_t numel;
    uint64_t begin, end;
} entry;

struct moe_st_file {
    char *path;
    const uint8_t *base;
    size_t len;
    int mapped;
    const uint8_t *data; /* start of the byte buffer (after the header) */
    uint64_t data_len;
    entry *e;            /* sorted by name */
    size_t n;
    char **meta_k, **meta_v; /* sorted by key */
    size_t n_meta;
};

static int cmp_entry_name(const void *a, const void *b)
{
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

static int cmp_entry_offset(const void *a, const void *b)
{
    const entry *x = *(const entry *const *)a, *y = *(const entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Parses one `name: {dtype, shape, data_offsets}` entry. */
static moe_status parse_entry(const moe_st_file *f, const cJSON *j, entry *e)
{
    char nb[128];
    const char *nm = shown(nb, j->string);
    if (!cJSON_IsObject(j)) return FMT_ERR(f, "tensor '%s': entry is not an object", nm);
    const cJSON *dt = NULL, *sh = NULL, *off = NULL;
    for (const cJSON *c = j->child; c; c = c->next) {
        const cJSON **slot = !strcmp(c->string, "dtype")          ? &dt
                             : !strcmp(c->string, "shape")        ? &sh
                             : !strcmp(c->string, "data_offsets") ? &off
                                                                  : NULL;
        char fb[128];
        if (!slot) return FMT_ERR(f, "tensor '%s': unknown field '%s'", nm, shown(fb, c->string));
        if (*slot) return FMT_ERR(f, "tensor '%s': field '%s' given twice", nm, c->string);
        *slot = c;
    }
    if (!dt) return FMT_ERR(f, "tensor '%s': missing field 'dtype'", nm);
    if (!sh) return FMT_ERR(f, "tensor '%s': missing field 'shape'", nm);
    if (!off) return FMT_ERR(f, "tensor '%s': missing field 'data_offsets'", nm);

    char db[128];
    if (!cJSON_IsString(dt)) return FMT_ERR(f, "tensor '%s': 'dtype' is not a string", nm);
    if (!dtype_parse(dt->valuestring, &e->dtype))
        return FMT_ERR(f, "tensor '%s': unknown dtype '%s'", nm, shown(db, dt->valuestring));

    if (!cJSON_IsArray(sh)) return FMT_ERR(f, "tensor '%s': 'shape' is not an array", nm);
    int rank = cJSON_GetArraySize(sh);
    if (rank > MOE_ST_MAX_RANK)
        return FMT_ERR(f, "tensor '%s': rank %d above the supported %d", nm, rank, MOE_ST_MAX_RANK);
    e->rank = rank;
    uint64_t numel = 1;
    int i = 0;
    for (const cJSON *c = sh->child; c; c = c->next, i++) {
        uint64_t v;
        if (!json_uint(c, &v))
            return FMT_ERR(f, "tensor '%s': shape[%d] is not a non-negative integer", nm, i);
        if (v > (uint64_t)INT64_MAX) return FMT_ERR(f, "tensor '%s': shape[%d] too large", nm, i);
        e->shape[i] = (int64_t)v;
        if (v && numel > (uint64_t)INT64_MAX / v)
            return FMT_ERR(f, "tensor '%s': the shape's element count overflows", nm);
        numel *= v;
    }
    e->numel = (int64_t)numel;
    const unsigned bits = (unsigned)dtypes[e->dtype].bits;
    if (numel > UINT64_MAX / bits) return FMT_ERR(f, "tensor '%s': the byte size overflows", nm);
    const uint64_t nbits = numel * bits;
    if (nbits % 8)
        return FMT_ERR(f, "tensor '%s': %llu elements of %s do not fill whole bytes", nm,
                       (unsigned long long)numel, dtypes[e->dtype].name);

    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || !json_uint(off->child, &e->begin) ||
        !json_uint(off->child->next, &e->end))
        return FMT_ERR(f, "tensor '%s': 'data_offsets' is not two non-negative integers", nm);
    if (e->end < e->begin)
        return FMT_ERR(f, "tensor '%s': data_offsets [%llu, %llu] end before they begin", nm,
                       (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end - e->begin != nbits / 8)
        return FMT_ERR(f, "tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but %s x %llu elements take %llu", nm, (unsigned long long)e->begin, (unsigned long long)e->end,
                       (unsigned long long)(e->end - e->begin), dtypes[e->dtype].name,
                       (unsigned long long)numel, (unsigned long long)(nbits / 8));
    if (e->end > f->data_len)
        return FMT_ERR(f, "tensor '%s': data_offsets [%llu, %llu] run past the %llu data bytes of the file",
                       nm, (unsigned long long)e->begin, (unsigned long long)e->end,
                       (unsigned long long)f->data_len);
    return MOE_OK;
}

static moe_status parse_metadata(moe_st_file *f, const cJSON *m)
{
    if (cJSON_IsNull(m)) return MOE_OK;
    if (!cJSON_IsObject(m)) return FMT_ERR(f, "'__metadata__' is not an object");
    size_t n = (size_t)cJSON_GetArraySize(m);
    f->meta_k = calloc(n ? n : 1, sizeof *f->meta_k);
    f->meta_v = calloc(n ? n : 1, sizeof *f->meta_v);
    if (!f->meta_k || !f->meta_v) return moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': metadata", f->path);
    char kb[128];
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return FMT_ERR(f, "'__metadata__' value of '%s' is not a string", shown(kb, c->string));
        f->meta_k[f->n_meta] = strdup(c->string);
        f->meta_v[f->n_meta] = strdup(c->valuestring);
        if (!f->meta_k[f->n_meta] || !f->meta_v[f->n_meta])
            return moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': metadata", f->path);
        f->n_meta++;
    }
    /* Sort the keys and carry the values along (pairs sorted by key). */
    char *(*pairs)[2] = malloc((f->n_meta ? f->n_meta : 1) * sizeof *pairs);
    if (!pairs) return moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': metadata", f->path);
    for (size_t i = 0; i < f->n_meta; i++) {
        pairs[i][0] = f->meta_k[i];
        pairs[i][1] = f->meta_v[i];
    }
    qsort(pairs, f->n_meta, sizeof *pairs, cmp_str_ptr); /* compares the first pointer of a pair */
    for (size_t i = 0; i < f->n_meta; i++) {
        f->meta_k[i] = pairs[i][0];
        f->meta_v[i] = pairs[i][1];
    }
    free(pairs);
    for (size_t i = 1; i < f->n_meta; i++)
        if (!strcmp(f->meta_k[i - 1], f->meta_k[i]))
            return FMT_ERR(f, "'__metadata__' key '%s' given twice", shown(kb, f->meta_k[i]));
    return MOE_OK;
}

/* Validates the header of f->base[0..len) and fills the tables. */
static moe_status parse(moe_st_file *f)
{
    if (f->len < 8) return FMT_ERR(f, "%zu bytes, shorter than the 8-byte header length", f->len);
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--) hn = (hn << 8) | f->base[i];
    if (hn > MOE_ST_MAX_HEADER)
        return FMT_ERR(f, "header length %llu above the %d-byte limit", (unsigned long long)hn,
                       MOE_ST_MAX_HEADER);
    if (hn > f->len - 8)
        return FMT_ERR(f, "header length %llu runs past the end of the file (%zu bytes)",
                       (unsigned long long)hn, f->len);
    const char *h = (const char *)f->base + 8;
    if (hn == 0 || h[0] != '{') return FMT_ERR(f, "the header does not start with '{'");
    if (!utf8_valid((const unsigned char *)h, (size_t)hn)) return FMT_ERR(f, "the header is not valid UTF-8");
    if (has_escaped_nul(h, (size_t)hn)) return FMT_ERR(f, "the header holds an escaped NUL (\\u0000)");
    f->data = f->base + 8 + hn;
    f->data_len = f->len - 8 - hn;

    /* cJSON wants a NUL-terminated text: copy the header (not the data). */
    char *text = malloc((size_t)hn + 1);
    if (!text) return moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': header of %llu bytes", f->path,
                                 (unsigned long long)hn);
    memcpy(text, h, (size_t)hn);
    text[hn] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 0);
    moe_status st = MOE_OK;
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t pos = at && at >= text && at <= text + hn ? (size_t)(at - text) : 0;
        st = FMT_ERR(f, "the header is not valid JSON (near byte %zu of %llu)", pos, (unsigned long long)hn);
        goto done;
    }
    /* After the JSON object only padding (JSON whitespace) may follow. */
    for (const char *p = end; p < text + hn; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            st = FMT_ERR(f, "unexpected byte 0x%02x after the header's JSON object (byte %zu)",
                         (unsigned char)*p, (size_t)(p - text));
            goto done;
        }
    if (!cJSON_IsObject(root)) {
        st = FMT_ERR(f, "the header is not a JSON object");
        goto done;
    }

    size_t n = 0;
    const cJSON *meta = NULL;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (!strcmp(c->string, "__metadata__")) {
            if (meta) {
                st = FMT_ERR(f, "'__metadata__' given twice");
                goto done;
            }
            meta = c;
        } else
            n++;
    }
    if (meta && (st = parse_metadata(f, meta)) != MOE_OK) goto done;
    f->e = calloc(n ? n : 1, sizeof *f->e);
    if (!f->e) {
        st = moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': %zu tensors", f->path, n);
        goto done;
    }
    for (const cJSON *c = root->child; c; c = c->next) {
        if (c == meta) continue;
        entry *e = &f->e[f->n];
        if ((st = parse_entry(f, c, e)) != MOE_OK) goto done;
        if (!(e->name = strdup(c->string))) {
            st = moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': tensor names", f->path);
            goto done;
        }
        f->n++;
    }
    qsort(f->e, f->n, sizeof *f->e, cmp_entry_name);
    char nb[128];
    for (size_t i = 1; i < f->n; i++)
        if (!strcmp(f->e[i - 1].name, f->e[i].name)) {
            st = FMT_ERR(f, "tensor '%s' given twice", shown(nb, f->e[i].name));
            goto done;
        }

    /* The byte buffer is covered exactly: in offset order every tensor
     * starts where the previous one ended, and the last ends at the end of
     * the file (no holes, no overlaps, no trailing bytes). */
    const entry **by_off = malloc((f->n ? f->n : 1) * sizeof *by_off);
    if (!by_off) {
        st = moe_errorf(MOE_ERR_NOMEM, "safetensors '%s': offsets", f->path);
        goto done;
    }
    for (size_t i = 0; i < f->n; i++) by_off[i] = &f->e[i];
    qsort(by_off, f->n, sizeof *by_off, cmp_entry_offset);
    uint64_t at = 0;
    for (size_t i = 0; i < f->n && st == MOE_OK; i++) {
        const entry *e = by_off[i];
        if (e->begin > at)
            st = FMT_ERR(f, "tensor '%s': %llu data bytes before it belong to no tensor (offset %llu)",
                         shown(nb, e->name), (unsigned long long)(e->begin - at), (unsigned long long)at);
        else if (e->begin < at)
            st = FMT_ERR(f, "tensor '%s': data_offsets [%llu, %llu] overlap '%s'", shown(nb, e->name),
                         (unsigned long long)e->begin, (unsigned long long)e->end, by_off[i - 1]->name);
        at = e->end;
    }
    if (st == MOE_OK && at != f->data_len)
        st = FMT_ERR(f, "the tensors cover %llu data bytes but the file holds %llu after the header",
                     (unsigned long long)at, (unsigned long long)f->data_len);
    free(by_off);
done:
    cJSON_Delete(root);
    free(text);
    return st;
}

static void file_free(moe_st_file *f)
{
    if (!f) return;
    for (size_t i = 0; i < f->n; i++) free(f->e[i].name);
    free(f->e);
    for (size_t i = 0; i < f->n_meta; i++) {
        free(f->meta_k[i]);
        free(f->meta_v[i]);
    }
    free(f->meta_k);
    free(f->meta_v);
    if (f->mapped && f->len) munmap((void *)f->base, f->len);
    free(f->path);
    free(f);
}

void moe_st_file_destroy(moe_st_file *f) { file_free(f); }

static moe_status file_new(moe_st_file **out, const char *label)
{
    *out = NULL;
    moe_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(label ? label : "(memory)"))) {
        free(f);
        return moe_errorf(MOE_ERR_NOMEM, "safetensors '%s'", label ? label : "(memory)");
    }
    *out = f;
    return MOE_OK;
}

moe_status moe_st_file_create_mem(moe_st_file **out, const void *buf, size_t len, const char *label)
{
    if (!out || (!buf && len)) return moe_errorf(MOE_ERR_ARG, "moe_st_file_create_mem: NULL argument");
    moe_st_file *f;
    moe_status st = file_new(&f, label);
    if (st != MOE_OK) return st;
    f->base = buf;
    f->len = len;
    if ((st = parse(f)) != MOE_OK) {
        file_free(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

moe_status moe_st_file_create(moe_st_file **out, const char *path)
{
    if (!out || !path) return moe_errorf(MOE_ERR_ARG, "moe_st_file_create: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open safetensors file '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        int err = errno;
        close(fd);
        return moe_errorf(MOE_ERR_IO, "safetensors '%s': not a regular file%s%s", path, err ? ": " : "",
                          err ? strerror(err) : "");
    }
    moe_st_file *f;
    moe_status st = file_new(&f, path);
    if (st != MOE_OK) {
        close(fd);
        return st;
    }
    f->len = (size_t)sb.st_size;
    if (f->len >= 8) {
        void *p = mmap(NULL, f->len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            st = moe_errorf(MOE_ERR_IO, "cannot map safetensors file '%s': %s", path, strerror(errno));
            close(fd);
            file_free(f);
            return st;
        }
        f->base = p;
        f->mapped = 1;
    }
    close(fd);
    if ((st = parse(f)) != MOE_OK) {
        file_free(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

const char *moe_st_file_path(const moe_st_file *f) { return f->path; }
size_t moe_st_file_count(const moe_st_file *f) { return f->n; }

static void fill_view(const moe_st_file *f, const entry *e, moe_st_view *v)
{
    memset(v, 0, sizeof *v);
    v->name = e->name;
    v->dtype = e->dtype;
    v->rank = e->rank;
    memcpy(v->shape, e->shape, sizeof e->shape);
    v->numel = e->numel;
    v->data = f->data + e->begin;
    v->nbytes = (size_t)(e->end - e->begin);
}

void moe_st_file_get(const moe_st_file *f, size_t i, moe_st_view *v) { fill_view(f, &f->e[i], v); }

static const entry *lookup(const moe_st_file *f, const char *name)
{
    entry key = {.name = (char *)name};
    return bsearch(&key, f->e, f->n, sizeof *f->e, cmp_entry_name);
}

int moe_st_file_find(const moe_st_file *f, const char *name, moe_st_view *v)
{
    const entry *e = name ? lookup(f, name) : NULL;
    if (!e) return 0;
    if (v) fill_view(f, e, v);
    return 1;
}

const char *moe_st_file_meta(const moe_st_file *f, const char *key)
{
    char **k = key ? bsearch(&key, f->meta_k, f->n_meta, sizeof *f->meta_k, cmp_str_ptr) : NULL;
    return k ? f->meta_v[k - f->meta_k] : NULL;
}

size_t moe_st_file_meta_count(const moe_st_file *f) { return f->n_meta; }

void moe_st_file_meta_get(const moe_st_file *f, size_t i, const char **key, const char **value)
{
    *key = f->meta_k[i];
    *value = f->meta_v[i];
}

/* ---- conversion ---- */

static inline uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* bfloat16 is the upper half of a float32: a shift (vectorised; the host
 * is little-endian, checked at the top of the file). */
void moe_st_bf16_to_f32(float *out, const void *src, size_t n)
{
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        const uint32_t u = (uint32_t)h << 16;
        memcpy(&out[i], &u, 4);
    }
}

/* IEEE binary16 -> binary32 by bit manipulation: normals rebias the
 * exponent (127 - 15 = 112); subnormals are m * 2^-24, exact in float32;
 * infinities and NaNs keep sign and payload. */
void moe_st_f16_to_f32(float *out, const void *src, size_t n)
{
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) {
        const uint32_t h = load_u16(s + 2 * i);
        const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
        uint32_t u;
        if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
        else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);
        else {
            /* m * 2^-24 as a float: exact (m < 2^10); the sign is or-ed on. */
            float x = (float)man * 0x1p-24f;
            memcpy(&u, &x, 4);
            u |= sign;
        }
        memcpy(&out[i], &u, 4);
    }
}

void moe_st_f16_to_f32_ref(float *out, const void *src, size_t n)
{
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) {
        const unsigned h = load_u16(s + 2 * i);
        const int e = (int)((h >> 10) & 0x1f);
        const unsigned m = h & 0x3ff;
        const double sg = (h & 0x8000) ? -1.0 : 1.0;
        double v;
        if (e == 0) v = sg * ldexp((double)m, -24);
        else if (e < 31) v = sg * ldexp(1024.0 + m, e - 25);
        else if (m == 0) v = sg * INFINITY;
        else {
            /* NaN: the payload shifts into the top of the float32 fraction. */
            uint32_t u = ((h & 0x8000u) << 16) | 0x7f800000u | ((uint32_t)m << 13);
            memcpy(&out[i], &u, 4);
            continue;
        }
        out[i] = (float)v;
    }
}

void moe_st_bf16_to_f32_ref(float *out, const void *src, size_t n)
{
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) {
        const unsigned h = load_u16(s + 2 * i);
        const int e = (int)((h >> 7) & 0xff);
        const unsigned m = h & 0x7f;
        const double sg = (h & 0x8000) ? -1.0 : 1.0;
        if (e == 0xff && m) {
            uint32_t u = (uint32_t)h << 16;
            memcpy(&out[i], &u, 4);
            continue;
        }
        double v = e == 0xff ? sg * INFINITY : e == 0 ? sg * ldexp((double)m, -133) : sg * ldexp(128.0 + m, e - 134);
        out[i] = (float)v;
    }
}

moe_status moe_st_to_f32(float *out, const moe_st_view *v, size_t n)
{
    char nb[128];
    if (!v || (!out && n)) return moe_errorf(MOE_ERR_ARG, "moe_st_to_f32: NULL argument");
    if ((int64_t)n != v->numel)
        return moe_errorf(MOE_ERR_ARG, "tensor '%s' has %lld elements, the destination %zu", shown(nb, v->name),
                          (long long)v->numel, n);
    switch (v->dtype) {
    case MOE_ST_F32: memcpy(out, v->data, n * sizeof(float)); return MOE_OK;
    case MOE_ST_F16: moe_st_f16_to_f32(out, v->data, n); return MOE_OK;
    case MOE_ST_BF16: moe_st_bf16_to_f32(out, v->data, n); return MOE_OK;
    default:
        return moe_errorf(MOE_ERR_ARG, "tensor '%s': unsupported dtype %s (F32, F16 and BF16 convert to float32)",
                          shown(nb, v->name), moe_st_dtype_str(v->dtype));
    }
}

moe_status moe_st_file_read_f32(moe_st_file *f, const char *name, float *out, size_t n)
{
    char nb[128];
    moe_st_view v;
    if (!f || !name) return moe_errorf(MOE_ERR_ARG, "moe_st_file_read_f32: NULL argument");
    if (!moe_st_file_find(f, name, &v))
        return moe_errorf(MOE_ERR_ARG, "safetensors '%s' has no tensor '%s'", f->path, shown(nb, name));
    moe_status st = moe_st_to_f32(out, &v, n);
    if (st != MOE_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", moe_error_detail());
        return moe_errorf(st, "safetensors '%s': %s", f->path, why);
    }
    if (f->mapped && v.nbytes) {
        /* Drop the file pages this tensor touched from our mapping (they
         * stay in the page cache; a later access faults them back in). */
        const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
        uintptr_t a = (uintptr_t)v.data & ~(pg - 1), b = ((uintptr_t)v.data + v.nbytes + pg - 1) & ~(pg - 1);
        madvise((void *)a, b - a, MADV_DONTNEED);
    }
    return MOE_OK;
}

/* ---- directories ---- */

static const char *const SINGLE = "model.safetensors";
static const char *const INDEX = "model.safetensors.index.json";

typedef struct {
    char *file;
    moe_st_file *f;
} shard;

typedef struct {
    char *name;
    int shard;
} wentry;

struct moe_st_dir {
    char *dir, *index; /* index: path of the index file, NULL for one file */
    shard *s;
    size_t ns;
    wentry *w; /* sorted by name */
    size_t nw;
};

static int cmp_wentry(const void *a, const void *b)
{
    return strcmp(((const wentry *)a)->name, ((const wentry *)b)->name);
}

static char *join(const char *dir, const char *file)
{
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, file);
    return p;
}

void moe_st_dir_destroy(moe_st_dir *d)
{
    if (!d) return;
    for (size_t i = 0; i < d->ns; i++) {
        free(d->s[i].file);
        moe_st_file_destroy(d->s[i].f);
    }
    free(d->s);
    for (size_t i = 0; i < d->nw; i++) free(d->w[i].name);
    free(d->w);
    free(d->dir);
    free(d->index);
    free(d);
}

static int file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* A shard name from the index: a plain file name in the directory. */
static int plain_file_name(const char *s)
{
    return *s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..") && strlen(s) < 256;
}

static moe_status read_text(const char *path, char **out, size_t limit)
{
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return moe_errorf(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(fp), &sb) != 0 || (uint64_t)sb.st_size > limit) {
        fclose(fp);
        return moe_errorf(MOE_ERR_FORMAT, "'%s' is larger than %zu bytes", path, limit);
    }
    char *t = malloc((size_t)sb.st_size + 1);
    if (!t) {
        fclose(fp);
        return moe_errorf(MOE_ERR_NOMEM, "reading '%s'", path);
    }
    size_t got = fread(t, 1, (size_t)sb.st_size, fp);
    int bad = ferror(fp);
    fclose(fp);
    if (bad || got != (size_t)sb.st_size) {
        free(t);
        return moe_errorf(MOE_ERR_IO, "cannot read '%s'", path);
    }
    t[got] = '\0';
    if (memchr(t, '\0', got) || !utf8_valid((const unsigned char *)t, got)) {
        free(t);
        return moe_errorf(MOE_ERR_FORMAT, "'%s' is not UTF-8 text", path);
    }
    *out = t;
    return MOE_OK;
}

static moe_status parse_index(moe_st_dir *d)
{
    char *text;
    moe_status st = read_text(d->index, &text, MOE_ST_MAX_HEADER);
    if (st != MOE_OK) return st;
    char nb[128];
    cJSON *root = cJSON_Parse(text);
    const cJSON *wm = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!root || !cJSON_IsObject(root)) st = moe_errorf(MOE_ERR_FORMAT, "index '%s' is not a JSON object", d->index);
    else if (!cJSON_IsObject(wm)) st = moe_errorf(MOE_ERR_FORMAT, "index '%s': no 'weight_map' object", d->index);
    else if (has_escaped_nul(text, strlen(text)))
        st = moe_errorf(MOE_ERR_FORMAT, "index '%s' holds an escaped NUL (\\u0000)", d->index);
    size_t n = st == MOE_OK ? (size_t)cJSON_GetArraySize(wm) : 0;
    if (st == MOE_OK && !(d->w = calloc(n ? n : 1, sizeof *d->w)))
        st = moe_errorf(MOE_ERR_NOMEM, "index '%s'", d->index);
    for (const cJSON *c = st == MOE_OK ? wm->child : NULL; c && st == MOE_OK; c = c->next) {
        if (!cJSON_IsString(c) || !plain_file_name(c->valuestring)) {
            st = moe_errorf(MOE_ERR_FORMAT, "index '%s': tensor '%s' maps to %s, not a file name in the directory",
                            d->index, shown(nb, c->string), cJSON_IsString(c) ? "a path" : "a non-string");
            break;
        }
        size_t k = 0;
        while (k < d->ns && strcmp(d->s[k].file, c->valuestring)) k++;
        if (k == d->ns) {
            shard *s = realloc(d->s, (d->ns + 1) * sizeof *s);
            if (!s) {
                st = moe_errorf(MOE_ERR_NOMEM, "index '%s'", d->index);
                break;
            }
            d->s = s;
            d->s[d->ns] = (shard){strdup(c->valuestring), NULL};
            if (!d->s[d->ns++].file) st = moe_errorf(MOE_ERR_NOMEM, "index '%s'", d->index);
        }
        d->w[d->nw] = (wentry){strdup(c->string), (int)k};
        if (!d->w[d->nw++].name) st = moe_errorf(MOE_ERR_NOMEM, "index '%s'", d->index);
    }
    if (st == MOE_OK) {
        qsort(d->w, d->nw, sizeof *d->w, cmp_wentry);
        for (size_t i = 1; i < d->nw && st == MOE_OK; i++)
            if (!strcmp(d->w[i - 1].name, d->w[i].name))
                st = moe_errorf(MOE_ERR_FORMAT, "index '%s': tensor '%s' listed twice in weight_map", d->index,
                                shown(nb, d->w[i].name));
    }
    cJSON_Delete(root);
    free(text);
    return st;
}

static const wentry *wlookup(const moe_st_dir *d, const char *name)
{
    wentry key = {.name = (char *)name};
    return bsearch(&key, d->w, d->nw, sizeof *d->w, cmp_wentry);
}

/* Opens shard k and holds it to the index. */
static moe_status open_shard(moe_st_dir *d, size_t k)
{
    shard *s = &d->s[k];
    if (s->f) return MOE_OK;
    char *path = join(d->dir, s->file);
    if (!path) return moe_errorf(MOE_ERR_NOMEM, "opening '%s'", s->file);
    moe_st_file *f;
    moe_status st = moe_st_file_create(&f, path);
    free(path);
    if (st != MOE_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", moe_error_detail());
        if (st == MOE_ERR_IO)
            return moe_errorf(st, "shard '%s' named by index '%s' is missing or unreadable: %s", s->file, d->index,
                              why);
        return moe_errorf(st, "%s (a shard of index '%s')", why, d->index);
    }
    char nb[128];
    for (size_t i = 0; i < f->n && st == MOE_OK; i++) {
        const wentry *w = wlookup(d, f->e[i].name);
        if (!w)
            st = moe_errorf(MOE_ERR_FORMAT, "shard '%s' holds tensor '%s', which index '%s' does not list", s->file,
                            shown(nb, f->e[i].name), d->index);
        else if ((size_t)w->shard != k)
            st = moe_errorf(MOE_ERR_FORMAT,
                            "tensor '%s' is present in two shards: '%s' holds it, and index '%s' maps it to '%s'",
                            shown(nb, f->e[i].name), s->file, d->index, d->s[w->shard].file);
    }
    for (size_t i = 0; i < d->nw && st == MOE_OK; i++)
        if ((size_t)d->w[i].shard == k && !lookup(f, d->w[i].name))
            st = moe_errorf(MOE_ERR_FORMAT, "index '%s' maps tensor '%s' to shard '%s', which lacks it", d->index,
                            shown(nb, d->w[i].name), s->file);
    if (st != MOE_OK) {
        moe_st_file_destroy(f);
        return st;
    }
    s->f = f;
    return MOE_OK;
}

moe_status moe_st_dir_create(moe_st_dir **out, const char *dir)
{
    if (!out || !dir) return moe_errorf(MOE_ERR_ARG, "moe_st_dir_create: NULL argument");
    *out = NULL;
    moe_st_dir *d = calloc(1, sizeof *d);
    if (!d || !(d->dir = strdup(dir))) {
        free(d);
        return moe_errorf(MOE_ERR_NOMEM, "opening '%s'", dir);
    }
    moe_status st = MOE_OK;
    char *single = join(dir, SINGLE);
    if (!single) st = moe_errorf(MOE_ERR_NOMEM, "opening '%s'", dir);
    else if (file_exists(single)) {
        /* One file: its header is the listing. */
        moe_st_file *f = NULL;
        st = moe_st_file_create(&f, single);
        if (st == MOE_OK && (!(d->s = calloc(1, sizeof *d->s)) || !(d->w = calloc(f->n ? f->n : 1, sizeof *d->w)) ||
                             !(d->s[0].file = strdup(SINGLE)))) {
            st = moe_errorf(MOE_ERR_NOMEM, "opening '%s'", single);
            moe_st_file_destroy(f);
        } else if (st == MOE_OK) {
            d->ns = 1;
            d->s[0].f = f;
            for (size_t i = 0; i < f->n && st == MOE_OK; i++) {
                d->w[i] = (wentry){strdup(f->e[i].name), 0};
                d->nw++;
                if (!d->w[i].name) st = moe_errorf(MOE_ERR_NOMEM, "opening '%s'", single);
            }
        }
    } else if (!(d->index = join(dir, INDEX))) st = moe_errorf(MOE_ERR_NOMEM, "opening '%s'", dir);
    else if (!file_exists(d->index))
        st = moe_errorf(MOE_ERR_IO, "'%s' holds neither %s nor %s", dir, SINGLE, INDEX);
    else st = parse_index(d);
    free(single);
    if (st != MOE_OK) {
        moe_st_dir_destroy(d);
        return st;
    }
    *out = d;
    return MOE_OK;
}

size_t moe_st_dir_count(const moe_st_dir *d) { return d->nw; }
const char *moe_st_dir_name(const moe_st_dir *d, size_t i) { return d->w[i].name; }
int moe_st_dir_has(const moe_st_dir *d, const char *name) { return name && wlookup(d, name) != NULL; }

moe_status moe_st_dir_find(moe_st_dir *d, const char *name, moe_st_view *v)
{
    char nb[128];
    if (!d || !name || !v) return moe_errorf(MOE_ERR_ARG, "moe_st_dir_find: NULL argument");
    const wentry *w = wlookup(d, name);
    if (!w) return moe_errorf(MOE_ERR_ARG, "checkpoint '%s' has no tensor '%s'", d->dir, shown(nb, name));
    moe_status st = open_shard(d, (size_t)w->shard);
    if (st != MOE_OK) return st;
    moe_st_file_find(d->s[w->shard].f, name, v);
    return MOE_OK;
}

moe_status moe_st_dir_read_f32(moe_st_dir *d, const char *name, float *out, size_t n)
{
    moe_st_view v;
    moe_status st = moe_st_dir_find(d, name, &v);
    if (st != MOE_OK) return st;
    return moe_st_file_read_f32(d->s[wlookup(d, name)->shard].f, name, out, n);
}

moe_status moe_st_dir_check(moe_st_dir *d)
{
    if (!d) return moe_errorf(MOE_ERR_ARG, "moe_st_dir_check: NULL argument");
    for (size_t k = 0; k < d->ns; k++) {
        moe_status st = open_shard(d, k);
        if (st != MOE_OK) return st;
    }
    return MOE_OK;
}

/* ---- writing ---- */

static void sb_printf(moe_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(moe_strbuf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) b->bad = 1; /* only short fixed texts pass through here */
    else moe_strbuf_put(b, tmp, (size_t)n);
}

/* A JSON string as serde_json writes it (ascii = 0: UTF-8 kept as is) or as
 * Python's json.dumps does (ascii = 1: non-ASCII as \uXXXX escapes). */
static void sb_json_str(moe_strbuf *b, const char *s, int ascii)
{
    moe_strbuf_put(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; u[i];) {
        unsigned c = u[i];
        char esc[16];
        if (c == '"') moe_strbuf_put(b, "\\\"", 2);
        else if (c == '\\') moe_strbuf_put(b, "\\\\", 2);
        else if (c == '\n') moe_strbuf_put(b, "\\n", 2);
        else if (c == '\r') moe_strbuf_put(b, "\\r", 2);
        else if (c == '\t') moe_strbuf_put(b, "\\t", 2);
        else if (c == '\b') moe_strbuf_put(b, "\\b", 2);
        else if (c == '\f') moe_strbuf_put(b, "\\f", 2);
        else if (c < 0x20 || (ascii && c == 0x7f)) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            moe_strbuf_puts(b, esc);
        } else if (c < 0x80 || !ascii) {
            moe_strbuf_put(b, (const char *)&u[i], 1);
        } else {
            /* Decode one (already validated) UTF-8 sequence. */
            int len = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : 4;
            unsigned cp = c & (len == 2 ? 0x1f : len == 3 ? 0x0f : 0x07);
            for (int k = 1; k < len; k++) cp = (cp << 6) | (u[i + k] & 0x3f);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
            } else
                snprintf(esc, sizeof esc, "\\u%04x", cp);
            moe_strbuf_puts(b, esc);
            i += (size_t)len;
            continue;
        }
        i++;
    }
    moe_strbuf_put(b, "\"", 1);
}

typedef struct {
    const void *p;
    uint64_t n;
} segment;

static moe_status sync_dir_of(const char *path)
{
    char *dir = strdup(path);
    if (!dir) return moe_errorf(MOE_ERR_NOMEM, "syncing the directory of '%s'", path);
    char *slash = strrchr(dir, '/');
    const char *d = !slash ? "." : slash == dir ? "/" : (*slash = '\0', dir);
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    moe_status st = MOE_OK;
    if (fd < 0 || fsync(fd) != 0) st = moe_errorf(MOE_ERR_IO, "cannot sync directory '%s': %s", d, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
    return st;
}

/* Writes the segments to path.tmp.<pid>, fsyncs, renames into place and
 * fsyncs the directory; on failure the temporary file is removed. */
static moe_status atomic_write(const char *path, const segment *seg, size_t nseg)
{
    size_t tn = strlen(path) + 32;
    char *tmp = malloc(tn);
    if (!tmp) return moe_errorf(MOE_ERR_NOMEM, "writing '%s'", path);
    snprintf(tmp, tn, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        moe_status st = moe_errorf(MOE_ERR_IO, "cannot create '%s': %s", tmp, strerror(errno));
        free(tmp);
        return st;
    }
    int err = 0;
    for (size_t i = 0; i < nseg && !err; i++) {
        const char *p = seg[i].p;
        uint64_t left = seg[i].n;
        while (left && !err) {
            size_t chunk = left > (1u << 30) ? (1u << 30) : (size_t)left;
            ssize_t w = write(fd, p, chunk);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) err = w < 0 ? errno : EIO;
            else {
                p += w;
                left -= (uint64_t)w;
            }
        }
        /* Test hook: an I/O error after the first segment (the header). */
        if (!err && i == 0 && moe_fault("st_write", 0)) err = EIO;
    }
    if (!err && fsync(fd) != 0) err = errno;
    if (close(fd) != 0 && !err) err = errno;
    moe_status st = MOE_OK;
    if (err) st = moe_errorf(MOE_ERR_IO, "cannot write '%s': %s", tmp, strerror(err));
    else if (rename(tmp, path) != 0)
        st = moe_errorf(MOE_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    if (st != MOE_OK) unlink(tmp);
    else st = sync_dir_of(path);
    free(tmp);
    return st;
}

moe_status moe_st_read_text(const char *path, char **text, size_t limit)
{
    if (!path || !text) return moe_errorf(MOE_ERR_ARG, "moe_st_read_text: NULL argument");
    return read_text(path, text, limit);
}

moe_status moe_st_write_bytes(const char *path, const void *data, size_t n)
{
    if (!path || (!data && n)) return moe_errorf(MOE_ERR_ARG, "moe_st_write_bytes: NULL argument");
    segment seg = {data, n};
    return atomic_write(path, &seg, 1);
}

static int cmp_tensor_ptr(const void *a, const void *b)
{
    return strcmp((*(const moe_st_tensor *const *)a)->name, (*(const moe_st_tensor *const *)b)->name);
}

/* Checks the tensors and returns their byte sizes in bytes[] (n). */
static moe_status check_tensors(const char *what, const moe_st_tensor *t, size_t n, uint64_t *bytes)
{
    char nb[128];
    for (size_t i = 0; i < n; i++) {
        const char *nm = t[i].name;
        if (!nm || !*nm) return moe_errorf(MOE_ERR_ARG, "writing '%s': tensor %zu has no name", what, i);
        if (!utf8_valid((const unsigned char *)nm, strlen(nm)) || !strcmp(nm, "__metadata__"))
            return moe_errorf(MOE_ERR_ARG, "writing '%s': tensor name '%s' cannot be a safetensors key", what,
                              shown(nb, nm));
        if (t[i].rank < 0 || t[i].rank > MOE_ST_MAX_RANK)
            return moe_errorf(MOE_ERR_ARG, "writing '%s': tensor '%s' has rank %d", what, shown(nb, nm), t[i].rank);
        uint64_t numel = 1;
        for (int k = 0; k < t[i].rank; k++) {
            int64_t s = t[i].shape[k];
            if (s < 0 || (s && numel > (UINT64_MAX / 4) / (uint64_t)s))
                return moe_errorf(MOE_ERR_ARG, "writing '%s': tensor '%s' has a bad shape[%d] = %lld", what,
                                  shown(nb, nm), k, (long long)s);
            numel *= (uint64_t)s;
        }
        if (numel && !t[i].data)
            return moe_errorf(MOE_ERR_ARG, "writing '%s': tensor '%s' has no data", what, shown(nb, nm));
        bytes[i] = numel * 4;
    }
    const moe_st_tensor **s = malloc((n ? n : 1) * sizeof *s);
    if (!s) return moe_errorf(MOE_ERR_NOMEM, "writing '%s'", what);
    for (size_t i = 0; i < n; i++) s[i] = &t[i];
    qsort(s, n, sizeof *s, cmp_tensor_ptr);
    moe_status st = MOE_OK;
    for (size_t i = 1; i < n && st == MOE_OK; i++)
        if (!strcmp(s[i - 1]->name, s[i]->name))
            st = moe_errorf(MOE_ERR_ARG, "writing '%s': tensor '%s' given twice", what, shown(nb, s[i]->name));
    free(s);
    return st;
}

/* Header JSON of the tensors `t` (already sorted by name), padded. */
static void build_header(moe_strbuf *h, const moe_st_tensor *const *t, size_t n, const uint64_t *bytes,
                         const moe_st_meta *meta)
{
    static const char *const def_k[] = {"format"}, *const def_v[] = {"pt"};
    const moe_st_meta def = {def_k, def_v, 1};
    if (!meta || !meta->n) meta = &def;
    moe_strbuf_puts(h, "{\"__metadata__\":{");
    /* Metadata keys in byte order (the Python library's are a hash map). */
    size_t done = 0;
    const char *last = NULL;
    while (done < meta->n) {
        size_t best = meta->n;
        for (size_t i = 0; i < meta->n; i++)
            if ((!last || strcmp(meta->keys[i], last) > 0) &&
                (best == meta->n || strcmp(meta->keys[i], meta->keys[best]) < 0))
                best = i;
        if (best == meta->n) break;
        if (done) moe_strbuf_puts(h, ",");
        sb_json_str(h, meta->keys[best], 0);
        moe_strbuf_puts(h, ":");
        sb_json_str(h, meta->values[best], 0);
        last = meta->keys[best];
        done++;
    }
    moe_strbuf_puts(h, "}");
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        moe_strbuf_puts(h, ",");
        sb_json_str(h, t[i]->name, 0);
        moe_strbuf_puts(h, ":{\"dtype\":\"F32\",\"shape\":[");
        for (int k = 0; k < t[i]->rank; k++) sb_printf(h, k ? ",%lld" : "%lld", (long long)t[i]->shape[k]);
        sb_printf(h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                  (unsigned long long)(off + bytes[i]));
        off += bytes[i];
    }
    moe_strbuf_puts(h, "}");
    while (h->n % 8) moe_strbuf_puts(h, " ");
}

/* Writes tensors idx[0..n) of t to path. */
static moe_status write_subset(const char *path, const moe_st_tensor *t, const size_t *idx, size_t n,
                               const uint64_t *bytes_all, const moe_st_meta *meta)
{
    moe_status st = MOE_OK;
    const moe_st_tensor **s = malloc((n ? n : 1) * sizeof *s);
    uint64_t *bytes = malloc((n ? n : 1) * sizeof *bytes);
    segment *seg = malloc((n + 1) * sizeof *seg);
    moe_strbuf h = {0}, head = {0};
    if (!s || !bytes || !seg) {
        st = moe_errorf(MOE_ERR_NOMEM, "writing '%s'", path);
        goto out;
    }
    for (size_t i = 0; i < n; i++) s[i] = &t[idx[i]];
    qsort(s, n, sizeof *s, cmp_tensor_ptr);
    for (size_t i = 0; i < n; i++) bytes[i] = bytes_all[s[i] - t];
    build_header(&h, s, n, bytes, meta);
    if (h.bad) {
        st = moe_errorf(MOE_ERR_NOMEM, "writing '%s': header", path);
        goto out;
    }
    if (h.n > MOE_ST_MAX_HEADER) {
        st = moe_errorf(MOE_ERR_ARG, "writing '%s': header of %zu bytes above the %d-byte limit", path, h.n,
                        MOE_ST_MAX_HEADER);
        goto out;
    }
    /* Segment 0: the length word and the header; then the tensors. */
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)h.n >> (8 * i));
    moe_strbuf_put(&head, (const char *)len8, 8);
    moe_strbuf_put(&head, h.p, h.n);
    if (head.bad) {
        st = moe_errorf(MOE_ERR_NOMEM, "writing '%s': header", path);
        goto out;
    }
    seg[0] = (segment){head.p, head.n};
    for (size_t i = 0; i < n; i++) seg[1 + i] = (segment){s[i]->data, bytes[i]};
    st = atomic_write(path, seg, n + 1);
out:
    free(head.p);
    free(h.p);
    free(seg);
    free(bytes);
    free(s);
    return st;
}

moe_status moe_st_write_file(const char *path, const moe_st_tensor *t, size_t n, const moe_st_meta *meta)
{
    if (!path || (!t && n)) return moe_errorf(MOE_ERR_ARG, "moe_st_write_file: NULL argument");
    uint64_t *bytes = malloc((n ? n : 1) * sizeof *bytes);
    size_t *idx = malloc((n ? n : 1) * sizeof *idx);
    moe_status st = !bytes || !idx ? moe_errorf(MOE_ERR_NOMEM, "writing '%s'", path) : MOE_OK;
    if (st == MOE_OK) st = check_tensors(path, t, n, bytes);
    if (st == MOE_OK) {
        for (size_t i = 0; i < n; i++) idx[i] = i;
        st = write_subset(path, t, idx, n, bytes, meta);
    }
    free(idx);
    free(bytes);
    return st;
}

/* Removes dir/file if it exists (the other layout's entry point). */
static moe_status remove_stale(const char *dir, const char *file)
{
    char *p = join(dir, file);
    if (!p) return moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir);
    moe_status st = MOE_OK;
    if (unlink(p) == 0) st = sync_dir_of(p);
    else if (errno != ENOENT) st = moe_errorf(MOE_ERR_IO, "cannot remove stale '%s': %s", p, strerror(errno));
    free(p);
    return st;
}

moe_status moe_st_write_dir(const char *dir, const moe_st_tensor *t, size_t n, uint64_t max_shard_bytes,
                            const moe_st_meta *meta)
{
    if (!dir || (!t && n)) return moe_errorf(MOE_ERR_ARG, "moe_st_write_dir: NULL argument");
    if (!max_shard_bytes) max_shard_bytes = MOE_ST_DEFAULT_SHARD_BYTES;
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return moe_errorf(MOE_ERR_IO, "checkpoint directory '%s' does not exist", dir);
    uint64_t *bytes = malloc((n ? n : 1) * sizeof *bytes);
    size_t *order = malloc((n ? n : 1) * sizeof *order); /* tensor indices, shard by shard */
    size_t *first = malloc((n + 2) * sizeof *first);      /* shard s: order[first[s] .. first[s+1]) */
    size_t *shard_of = NULL;                              /* final shard of each tensor */
    char *path = NULL;
    moe_strbuf ix = {0};
    moe_status st = !bytes || !order || !first ? moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir) : MOE_OK;
    if (st == MOE_OK) st = check_tensors(dir, t, n, bytes);
    if (st != MOE_OK) goto out;

    /* huggingface_hub's split, in the given order: a tensor above the limit
     * gets a shard of its own at once; one that would tip the open shard
     * over the limit closes it and opens a new one. Shards are numbered in
     * the order they are closed (so a big tensor's shard can come before
     * the open shard that holds earlier tensors). */
    shard_of = malloc((n ? n : 1) * sizeof *shard_of);
    size_t *num = malloc((n + 1) * sizeof *num); /* final number of each provisional shard */
    if (!shard_of || !num) {
        free(num);
        st = moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir);
        goto out;
    }
    size_t nprov = 0, ns = 0, open_sh = SIZE_MAX;
    uint64_t open_bytes = 0, total = 0;
    for (size_t i = 0; i < n; i++) {
        total += bytes[i];
        if (bytes[i] > max_shard_bytes) {
            shard_of[i] = nprov;
            num[nprov++] = ns++;
            continue;
        }
        if (open_sh != SIZE_MAX && open_bytes + bytes[i] > max_shard_bytes) {
            num[open_sh] = ns++;
            open_sh = SIZE_MAX;
        }
        if (open_sh == SIZE_MAX) {
            open_sh = nprov++;
            open_bytes = 0;
        }
        shard_of[i] = open_sh;
        open_bytes += bytes[i];
    }
    if (open_sh != SIZE_MAX) num[open_sh] = ns++;
    for (size_t i = 0; i < n; i++) shard_of[i] = num[shard_of[i]];
    free(num);
    if (ns == 0) ns = 1; /* no tensors: one empty file */
    size_t pos = 0;
    for (size_t r = 0; r < ns; r++) {
        first[r] = pos;
        for (size_t i = 0; i < n; i++)
            if (shard_of[i] == r) order[pos++] = i;
    }
    first[ns] = pos;

    if (ns == 1) {
        if (!(path = join(dir, SINGLE))) st = moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir);
        if (st == MOE_OK) st = write_subset(path, t, order, n, bytes, meta);
        if (st == MOE_OK) st = remove_stale(dir, INDEX);
        goto out;
    }
    char name[64];
    for (size_t r = 0; r < ns && st == MOE_OK; r++) {
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", r + 1, ns);
        free(path);
        if (!(path = join(dir, name))) st = moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir);
        else st = write_subset(path, t, order + first[r], first[r + 1] - first[r], bytes, meta);
    }
    if (st == MOE_OK) {
        /* The index as transformers writes it: json.dumps(indent=2, sort_keys=True) + "\n". */
        const moe_st_tensor **s = malloc(n * sizeof *s);
        if (!s) st = moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir);
        for (size_t i = 0; s && i < n; i++) s[i] = &t[i];
        if (s) qsort(s, n, sizeof *s, cmp_tensor_ptr);
        sb_printf(&ix, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {",
                  (unsigned long long)total);
        for (size_t i = 0; s && i < n; i++) {
            size_t k = (size_t)(s[i] - t);
            moe_strbuf_puts(&ix, i ? ",\n    " : "\n    ");
            sb_json_str(&ix, s[i]->name, 1);
            snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", shard_of[k] + 1, ns);
            moe_strbuf_puts(&ix, ": ");
            sb_json_str(&ix, name, 1);
        }
        moe_strbuf_puts(&ix, "\n  }\n}\n");
        free(s);
        if (st == MOE_OK && ix.bad) st = moe_errorf(MOE_ERR_NOMEM, "writing '%s': index", dir);
        free(path);
        path = NULL;
        if (st == MOE_OK && !(path = join(dir, INDEX))) st = moe_errorf(MOE_ERR_NOMEM, "writing '%s'", dir);
        if (st == MOE_OK) {
            segment seg = {ix.p, ix.n};
            st = atomic_write(path, &seg, 1);
        }
        if (st == MOE_OK) st = remove_stale(dir, SINGLE);
    }
out:
    free(shard_of);
    free(ix.p);
    free(path);
    free(first);
    free(order);
    free(bytes);
    return st;
}
