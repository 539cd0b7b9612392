/* Run-directory bookkeeping for checkpoints: file names, the `latest`
 * pointer (a one-line text file naming the newest complete checkpoint,
 * replaced atomically), keep_last pruning, and resolving a run directory
 * to its latest checkpoint. Local file operations, nothing collective. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"

enum { NAME_MAX_ = 256, PATH_MAX_ = 4096 };

moe_status moe_ckpt_path(char *buf, size_t cap, const char *out_dir, int64_t step)
{
    if (!buf || !out_dir || step < 0) return moe_errorf(MOE_ERR_ARG, "checkpoint path: bad arguments");
    if ((size_t)snprintf(buf, cap, "%s/ckpt-%06lld.h5", out_dir, (long long)step) >= cap)
        return moe_errorf(MOE_ERR_ARG, "checkpoint path too long for out_dir '%s'", out_dir);
    return MOE_OK;
}

/* Step of a file name "ckpt-<digits>.h5", or -1 for any other name. */
static int64_t ckpt_step_of(const char *name)
{
    if (strncmp(name, "ckpt-", 5) != 0) return -1;
    const char *p = name + 5;
    int64_t step = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 18; p++, digits++) step = step * 10 + (*p - '0');
    return digits > 0 && !strcmp(p, ".h5") ? step : -1;
}

static moe_status write_latest(const char *out_dir, const char *name)
{
    char tmp[PATH_MAX_], dst[PATH_MAX_];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s/latest.tmp", out_dir) >= sizeof tmp ||
        (size_t)snprintf(dst, sizeof dst, "%s/latest", out_dir) >= sizeof dst)
        return moe_errorf(MOE_ERR_ARG, "run directory path too long: '%s'", out_dir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot create '%s': %s", tmp, strerror(errno));
    char line[NAME_MAX_ + 2];
    size_t n = (size_t)snprintf(line, sizeof line, "%s\n", name);
    int ok = write(fd, line, n) == (ssize_t)n && fsync(fd) == 0;
    int err = errno;
    ok = close(fd) == 0 && ok;
    if (!ok) {
        remove(tmp);
        return moe_errorf(MOE_ERR_IO, "cannot write '%s': %s", tmp, strerror(err));
    }
    if (rename(tmp, dst) != 0) {
        err = errno;
        remove(tmp);
        return moe_errorf(MOE_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, dst, strerror(err));
    }
    return MOE_OK;
}

/* Reads the file name held by out_dir/latest into name (cap bytes): one
 * line "ckpt-<digits>.h5" as moe_ckpt_commit writes it. Anything else is
 * refused without echoing it (a damaged file may hold any bytes), and a
 * `latest` that is not a regular file (a pipe would block) is refused
 * before it is opened. */
static moe_status read_latest(const char *out_dir, char *name, size_t cap)
{
    char p[PATH_MAX_];
    if ((size_t)snprintf(p, sizeof p, "%s/latest", out_dir) >= sizeof p)
        return moe_errorf(MOE_ERR_ARG, "run directory path too long: '%s'", out_dir);
    struct stat sb;
    if (stat(p, &sb) != 0) return moe_errorf(MOE_ERR_IO, "'%s' has no readable 'latest' file: %s", out_dir, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return moe_errorf(MOE_ERR_FORMAT, "'%s' is not a regular file", p);
    int fd = open(p, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", p, strerror(errno));
    char buf[NAME_MAX_ + 2];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0) return moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", p, strerror(errno));
    buf[n] = '\0';
    size_t len = strcspn(buf, "\n");
    const int one_line = len + 1 >= (size_t)n; /* nothing after the first newline */
    buf[len] = '\0';
    if (!one_line || ckpt_step_of(buf) < 0 || len >= cap)
        return moe_errorf(MOE_ERR_FORMAT,
                          "'%s' is damaged: it should hold one line naming a checkpoint (ckpt-NNNNNN.h5), it holds "
                          "%lld bytes that do not; resume from a checkpoint file instead (--resume=%s/ckpt-...h5)",
                          p, (long long)sb.st_size, out_dir);
    memcpy(name, buf, len + 1);
    return MOE_OK;
}

typedef struct {
    int64_t step;
    char name[NAME_MAX_];
} ckpt_entry;

static int cmp_entry(const void *a, const void *b)
{
    const ckpt_entry *x = a, *y = b;
    return (x->step > y->step) - (x->step < y->step);
}

/* Deletes the oldest ckpt-*.h5 beyond keep_last, sparing `keep` (a name). */
static moe_status prune(const char *out_dir, int keep_last, const char *keep)
{
    DIR *d = opendir(out_dir);
    if (!d) return moe_errorf(MOE_ERR_IO, "cannot list '%s': %s", out_dir, strerror(errno));
    ckpt_entry *v = NULL;
    size_t n = 0, cap = 0;
    moe_status st = MOE_OK;
    for (struct dirent *e; (e = readdir(d));) {
        int64_t s = ckpt_step_of(e->d_name);
        if (s < 0 || strlen(e->d_name) >= NAME_MAX_) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            ckpt_entry *p = realloc(v, cap * sizeof *p);
            if (!p) {
                st = moe_errorf(MOE_ERR_NOMEM, "pruning '%s'", out_dir);
                break;
            }
            v = p;
        }
        v[n].step = s;
        snprintf(v[n].name, sizeof v[n].name, "%s", e->d_name);
        n++;
    }
    closedir(d);
    if (st == MOE_OK && n > (size_t)keep_last) {
        qsort(v, n, sizeof *v, cmp_entry);
        char p[PATH_MAX_];
        for (size_t i = 0; st == MOE_OK && i < n - (size_t)keep_last; i++) {
            if (!strcmp(v[i].name, keep)) continue;
            snprintf(p, sizeof p, "%s/%s", out_dir, v[i].name);
            if (remove(p) != 0 && errno != ENOENT)
                st = moe_errorf(MOE_ERR_IO, "cannot delete old checkpoint '%s': %s", p, strerror(errno));
        }
    }
    free(v);
    return st;
}

moe_status moe_ckpt_commit(const char *out_dir, const char *ckpt_path, int keep_last)
{
    if (!out_dir || !ckpt_path) return moe_errorf(MOE_ERR_ARG, "checkpoint commit: NULL path");
    const char *slash = strrchr(ckpt_path, '/');
    const char *base = slash ? slash + 1 : ckpt_path;
    if (!*base || strlen(base) >= NAME_MAX_)
        return moe_errorf(MOE_ERR_ARG, "checkpoint commit: bad file name '%s'", ckpt_path);
    moe_status st = write_latest(out_dir, base);
    if (st == MOE_OK && keep_last > 0) st = prune(out_dir, keep_last, base);
    return st;
}

moe_status moe_ckpt_resolve(char *buf, size_t cap, const char *path)
{
    if (!buf || !path || !*path) return moe_errorf(MOE_ERR_ARG, "checkpoint resolve: empty path");
    struct stat sb;
    if (stat(path, &sb) != 0) return moe_errorf(MOE_ERR_IO, "cannot find checkpoint '%s': %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode) && !S_ISREG(sb.st_mode))
        return moe_errorf(MOE_ERR_IO, "checkpoint '%s' is not a regular file (nor a run directory)", path);
    if (!S_ISDIR(sb.st_mode)) {
        if ((size_t)snprintf(buf, cap, "%s", path) >= cap)
            return moe_errorf(MOE_ERR_ARG, "checkpoint path too long: '%s'", path);
        return MOE_OK;
    }
    char name[NAME_MAX_];
    moe_status st = read_latest(path, name, sizeof name);
    if (st != MOE_OK) return st;
    if ((size_t)snprintf(buf, cap, "%s/%s", path, name) >= cap)
        return moe_errorf(MOE_ERR_ARG, "checkpoint path too long: '%s/%s'", path, name);
    if (stat(buf, &sb) != 0)
        return moe_errorf(MOE_ERR_IO, "'%s/latest' names '%s', which cannot be found: %s", path, name,
                          strerror(errno));
    return MOE_OK;
}
