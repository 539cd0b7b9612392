/* Shared by the fuzz harnesses (fuzz_*.c): the libFuzzer entry point, a
 * scratch file for parsers that take a path, and the one way a harness
 * reports a violated property (a message, then abort, which AFL++ and the
 * replay test both see as a crash). */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/moe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Aborts with "fuzz: <what>" unless cond holds. */
#define FUZZ_CHECK(cond, ...)                                                                                  \
    do {                                                                                                       \
        if (!(cond)) {                                                                                         \
            fprintf(stderr, "fuzz: property violated at %s:%d: ", __FILE__, __LINE__);                         \
            fprintf(stderr, __VA_ARGS__);                                                                      \
            fprintf(stderr, " (detail: '%s')\n", moe_error_detail());                                         \
            abort();                                                                                           \
        }                                                                                                      \
    } while (0)

/* A rejected input: a status other than MOE_OK with a detail that names
 * `name` (the file or origin the parser was given). */
#define FUZZ_CHECK_REJECT(st, name)                                                                            \
    FUZZ_CHECK((st) != MOE_OK && strstr(moe_error_detail(), (name)) != NULL,                                   \
               "status %d without a detail naming '%s'", (int)(st), (name))

/* Writes the input to a per-process scratch file (on tmpfs when /dev/shm
 * exists, so that a campaign does not wear a disk) and returns its path, a
 * static buffer. Aborts if it cannot: the harness, not the parser, failed. */
static inline const char *fuzz_scratch(const uint8_t *data, size_t size, const char *suffix)
{
    static char path[256];
    const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(path, sizeof path, "%s/moe-fuzz-%ld%s", dir, (long)getpid(), suffix);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        perror(path);
        abort();
    }
    for (size_t o = 0; o < size;) {
        ssize_t w = write(fd, data + o, size - o);
        if (w <= 0) {
            perror(path);
            abort();
        }
        o += (size_t)w;
    }
    close(fd);
    return path;
}

#endif
