/* Replays inputs through one fuzz harness without a fuzzing engine, so that
 * every build (and the AddressSanitizer + UBSan pass) runs the saved corpora
 * (tests/fuzz):  fuzz_<name>_replay FILE|DIR...
 * A directory means every regular file in it, in name order. Exit 0 when
 * every input passes; a violated property aborts (the harness prints it);
 * an input that runs longer than MOE_FUZZ_REPLAY_TIMEOUT seconds (default
 * 20) is a hang: its name is printed and the exit status is 1. */
#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *current;

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "fuzz replay: HANG (timeout) on input ";
    ssize_t r = write(2, msg, sizeof msg - 1);
    r = write(2, current, strlen(current));
    r = write(2, "\n", 1);
    (void)r;
    _exit(1);
}

static int replay_file(const char *path, unsigned timeout)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz replay: cannot open '%s'\n", path);
        return -1;
    }
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0, got;
    do {
        if (n == cap) {
            cap = cap ? 2 * cap : 4096;
            uint8_t *p = realloc(buf, cap);
            if (!p) {
                free(buf);
                fclose(f);
                return -1;
            }
            buf = p;
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
    } while (got > 0);
    fclose(f);
    current = path;
    alarm(timeout);
    LLVMFuzzerTestOneInput(buf, n);
    alarm(0);
    free(buf);
    return 1;
}

static int by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

int main(int argc, char **argv)
{
    const char *t = getenv("MOE_FUZZ_REPLAY_TIMEOUT");
    unsigned timeout = t && atoi(t) > 0 ? (unsigned)atoi(t) : 20;
    signal(SIGALRM, on_alarm);
    long count = 0;
    for (int i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0) {
            fprintf(stderr, "fuzz replay: no such file or directory '%s'\n", argv[i]);
            return 1;
        }
        if (!S_ISDIR(sb.st_mode)) {
            int r = replay_file(argv[i], timeout);
            if (r < 0) return 1;
            count += r;
            continue;
        }
        struct dirent **names;
        int n = scandir(argv[i], &names, NULL, by_name);
        if (n < 0) {
            fprintf(stderr, "fuzz replay: cannot list '%s'\n", argv[i]);
            return 1;
        }
        for (int k = 0; k < n; k++) {
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", argv[i], names[k]->d_name);
            free(names[k]);
            if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode)) continue;
            int r = replay_file(p, timeout);
            if (r < 0) return 1;
            count += r;
        }
        free(names);
    }
    printf("fuzz replay: %ld inputs passed\n", count);
    return count > 0 ? 0 : 1;
}
