/* moe help: the general usage, a command's help, or man pages.
 *
 * A man page is made from what the command itself prints for --help, run
 * in a child process (commands keep getopt and other static state), and
 * converted to roff: the "usage:" lines become the SYNOPSIS, text at
 * column 0 paragraphs, "  TAG  description" lines tagged paragraphs
 * (deeper-indented lines continue them), and a "Heading:" line before an
 * indented block a subsection. The options of moe train are not taken from
 * its help text but from the key table itself (moe_train_config_key_doc_get),
 * with what each key accepts. The build writes every page with
 * `moe help --man-dir DIR` (cmake/moerunInstall.cmake), so the pages cannot
 * drift from --help. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/cli.h"
#include "config/config.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: moe help [COMMAND...]          the help of a command (as moe COMMAND --help)\n"
               "       moe help --man [COMMAND...]    its man page (roff) on standard output; no COMMAND: moe(1)\n"
               "       moe help --man-dir DIR         every man page into DIR: moe.1 and moe-COMMAND.1\n"
               "                                      (words joined by '-', e.g. moe-bench-layer.1)\n");
}

/* ---- roff ---- */

/* Text for a roff text line: backslashes and minus signs escaped, a
 * leading control character neutralised. */
static void roff_text(FILE *f, const char *s, size_t n)
{
    if (n && (s[0] == '.' || s[0] == '\'')) fputs("\\&", f);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\')
            fputs("\\e", f);
        else if (s[i] == '-')
            fputs("\\-", f);
        else
            fputc(s[i], f);
    }
}

static void roff_str(FILE *f, const char *s) { roff_text(f, s, strlen(s)); }

/* "--ckpt FILE|RUNDIR": the first word in bold, the rest in italics. */
static void roff_tag(FILE *f, const char *s, size_t n)
{
    size_t w = 0;
    while (w < n && s[w] != ' ') w++;
    fputs("\\fB", f);
    roff_text(f, s, w);
    fputs("\\fR", f);
    while (w < n && s[w] == ' ') w++;
    if (w < n) {
        fputs(" \\fI", f);
        roff_text(f, s + w, n - w);
        fputs("\\fR", f);
    }
    fputc('\n', f);
}

static size_t indent_of(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n && s[i] == ' ') i++;
    return i;
}

/* One line of a text: where it starts, its length without the '\n'. */
typedef struct {
    const char *p;
    size_t n;
} line;

static int split_lines(line **out, const char *text)
{
    int cap = 64, n = 0;
    line *v = malloc(sizeof *v * (size_t)cap);
    for (const char *p = text; v && *p;) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n == cap) {
            line *w = realloc(v, sizeof *v * (size_t)(cap *= 2));
            if (!w) free(v);
            v = w;
            if (!v) break;
        }
        v[n++] = (line){p, len};
        p += len + (e != NULL);
    }
    *out = v;
    return v ? n : -1;
}

/* SYNOPSIS and DESCRIPTION of one help text (see the file comment). */
static void roff_help_body(FILE *f, const line *L, int n)
{
    int i = 0;
    while (i < n && strncmp(L[i].p, "usage: ", 7)) i++;
    if (i < n) {
        fputs(".SH SYNOPSIS\n.nf\n", f);
        roff_text(f, L[i].p + 7, L[i].n - 7);
        fputc('\n', f);
        /* continuation lines of the usage are indented under it */
        for (i++; i < n && indent_of(L[i].p, L[i].n) >= 8; i++) {
            roff_text(f, L[i].p + 7, L[i].n - 7);
            fputc('\n', f);
        }
        fputs(".fi\n", f);
    } else {
        i = 0;
    }
    fputs(".SH DESCRIPTION\n", f);
    enum { NONE, PARA, ITEM } state = NONE;
    int fresh = 1; /* a blank line ended the last block */
    for (; i < n; i++) {
        const char *s = L[i].p;
        size_t len = L[i].n, ind = indent_of(s, len);
        while (len > ind && s[len - 1] == ' ') len--;
        if (len == ind) {
            fresh = 1;
            continue;
        }
        if (ind == 0) {
            int heading = s[len - 1] == ':' && i + 1 < n && indent_of(L[i + 1].p, L[i + 1].n) > 0 &&
                          indent_of(L[i + 1].p, L[i + 1].n) < L[i + 1].n;
            if (heading) {
                fputs(".SS ", f);
                fputc(s[0] >= 'a' && s[0] <= 'z' ? s[0] - 'a' + 'A' : s[0], f);
                roff_text(f, s + 1, len - 2);
                fputc('\n', f);
                state = NONE;
            } else {
                if (state != PARA || fresh) fputs(".PP\n", f);
                roff_text(f, s, len);
                fputc('\n', f);
                state = PARA;
            }
        } else if (ind >= 8 && state != NONE) {
            roff_text(f, s + ind, len - ind);
            fputc('\n', f);
        } else {
            /* a tag, then two or more spaces, then its description */
            const char *gap = NULL;
            for (size_t k = ind; k + 1 < len && !gap; k++)
                if (s[k] == ' ' && s[k + 1] == ' ') gap = s + k;
            const char *desc = gap;
            while (desc && desc < s + len && *desc == ' ') desc++;
            fputs(".TP\n", f);
            roff_tag(f, s + ind, (size_t)((gap ? gap : s + len) - (s + ind)));
            if (desc && desc < s + len) {
                roff_text(f, desc, (size_t)(s + len - desc));
                fputc('\n', f);
            }
            state = ITEM;
        }
        fresh = 0;
    }
}

/* The OPTIONS of moe train: every key of the table by section. */
static int roff_key_table(FILE *f)
{
    fputs(".SH OPTIONS\n"
          "Each key below is set as \\fIkey\\fR = \\fIvalue\\fR in the INI file (any section or none)\n"
          "or as \\fB\\-\\-\\fR\\fIkey\\fR=\\fIvalue\\fR on the command line; '\\-' in a key reads as '_'.\n",
          f);
    const char *section = NULL;
    for (int i = 0; i < moe_train_config_n_keys(); i++) {
        moe_train_config_key_doc k;
        if (moe_train_config_key_doc_get(i, &k)) return 1;
        if (!section || strcmp(section, k.section)) {
            section = k.section;
            fputs(".SS [", f);
            roff_str(f, section);
            fputs("]\n", f);
        }
        fputs(".TP\n\\fB", f);
        roff_str(f, k.name);
        fputs("\\fR (default \\fI", f);
        roff_str(f, k.default_text[0] ? k.default_text : "\"\"");
        fputs("\\fR)\n", f);
        roff_str(f, k.help);
        fputs(".\n", f);
        if (!strstr(k.help, k.accepts)) { /* "gelu, relu or swiglu" says it already */
            fputs("Accepts ", f);
            roff_str(f, k.accepts);
            fputs(".\n", f);
        }
    }
    return 0;
}

/* ---- pages ---- */

enum { MAX_WORDS = 4 };

/* argv of `moe WORDS --help` in buf (words NULL: `moe --help`). */
static int help_argv(char **argv, char *buf, size_t cap, const char *words)
{
    int argc = 0;
    argv[argc++] = (char *)"moe";
    if (words) {
        snprintf(buf, cap, "%s", words);
        for (char *w = strtok(buf, " "); w && argc < MAX_WORDS + 1; w = strtok(NULL, " ")) argv[argc++] = w;
    }
    argv[argc++] = (char *)"--help";
    argv[argc] = NULL;
    return argc;
}

/* What `moe WORDS --help` prints, as a new string; 1 (message printed)
 * if it fails or prints nothing. */
static int capture_help(char **out, const char *words)
{
    char buf[256], *argv[MAX_WORDS + 3];
    const int argc = help_argv(argv, buf, sizeof buf, words);
    const char *name = words ? words : "";
    int fd[2];
    if (pipe(fd)) {
        fprintf(stderr, "moe help: pipe: %s\n", strerror(errno));
        return 1;
    }
    fflush(stdout);
    fflush(stderr);
    const pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "moe help: fork: %s\n", strerror(errno));
        close(fd[0]);
        close(fd[1]);
        return 1;
    }
    if (pid == 0) {
        close(fd[0]);
        if (dup2(fd[1], STDOUT_FILENO) < 0) _exit(127);
        close(fd[1]);
        const int rc = moe_cli_dispatch(argc, argv);
        fflush(stdout);
        _exit(rc & 0xff);
    }
    close(fd[1]);
    size_t n = 0, cap = 4096;
    char *text = malloc(cap);
    for (ssize_t r = 1; text && r > 0;) {
        if (cap - n < 1024) {
            char *t = realloc(text, cap *= 2);
            if (!t) free(text);
            text = t;
            if (!text) break;
        }
        r = read(fd[0], text + n, cap - n - 1);
        if (r > 0) n += (size_t)r;
        if (r < 0 && errno == EINTR) r = 1;
    }
    close(fd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (!text || !WIFEXITED(status) || WEXITSTATUS(status) != 0 || n == 0) {
        fprintf(stderr, "moe help: 'moe %s%s--help' %s\n", name, *name ? " " : "",
                !text ? "output: out of memory" : n == 0 ? "printed nothing" : "failed");
        free(text);
        return 1;
    }
    text[n] = '\0';
    *out = text;
    return 0;
}

/* "moe-bench-layer" for "bench layer"; "moe" for NULL. */
static void page_name(char *buf, size_t cap, const moe_cli_command *c)
{
    snprintf(buf, cap, "moe%s%s", c ? "-" : "", c ? c->words : "");
    for (char *p = buf; *p; p++)
        if (*p == ' ') *p = '-';
}

/* The man page of command c (NULL: moe(1)). */
static int write_page(FILE *f, const moe_cli_command *c)
{
    char *text = NULL;
    line *L = NULL;
    if (capture_help(&text, c ? c->words : NULL)) return 1;
    int n = split_lines(&L, text);
    if (n < 0) {
        free(text);
        fprintf(stderr, "moe help: out of memory\n");
        return 1;
    }
    char name[128];
    page_name(name, sizeof name, c);
    fputs(".TH \"", f);
    for (const char *p = name; *p; p++) fputc(*p >= 'a' && *p <= 'z' ? *p - 'a' + 'A' : *p, f);
    /* no hyphenation, ragged right: option names stay whole */
    fprintf(f, "\" 1 \"\" \"moerun %s\" \"moerun manual\"\n.nh\n.ad l\n.SH NAME\n", MOE_VERSION);
    roff_str(f, name);
    fputs(" \\- ", f);
    roff_str(f, c ? c->summary : "expert-parallel Mixture-of-Experts training and inference (moerun)");
    fputc('\n', f);
    int rc = 0;
    if (c && c->key_table) {
        /* --help lists the keys under [section] lines: the table does it here */
        int keep = 0;
        while (keep < n && L[keep].p[0] != '[') keep++;
        while (keep > 0 && (L[keep - 1].n == 0 || L[keep - 1].p[L[keep - 1].n - 1] == ':')) keep--;
        roff_help_body(f, L, keep);
        rc = roff_key_table(f);
    } else {
        roff_help_body(f, L, n);
    }
    /* moe(1) lists every command page; a command page points back to it */
    fputs(".SH SEE ALSO\n", f);
    if (c) fputs(".BR moe (1)\n", f);
    for (int i = 0; !c && i < moe_cli_n_commands; i++) {
        page_name(name, sizeof name, &moe_cli_commands[i]);
        fputs(".BR ", f);
        roff_str(f, name);
        fputs(i + 1 < moe_cli_n_commands ? " (1) ,\n" : " (1)\n", f);
    }
    free(L);
    free(text);
    return rc;
}

static const moe_cli_command *find_command(int argc, char **argv)
{
    char words[256] = "";
    size_t len = 0;
    for (int i = 0; i < argc; i++)
        len += (size_t)snprintf(words + len, len < sizeof words ? sizeof words - len : 0, "%s%s", i ? " " : "",
                                argv[i]);
    for (int i = 0; i < moe_cli_n_commands; i++)
        if (!strcmp(moe_cli_commands[i].words, words)) return &moe_cli_commands[i];
    fprintf(stderr, "moe help: no command '%s' (commands:", words);
    for (int i = 0; i < moe_cli_n_commands; i++) fprintf(stderr, "%s %s", i ? "," : "", moe_cli_commands[i].words);
    fprintf(stderr, ")\n");
    return NULL;
}

static int write_page_file(const char *dir, const moe_cli_command *c)
{
    char name[128], path[4096];
    page_name(name, sizeof name, c);
    snprintf(path, sizeof path, "%s/%s.1", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "moe help: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    int rc = write_page(f, c);
    if (fclose(f) && !rc) {
        fprintf(stderr, "moe help: cannot write %s: %s\n", path, strerror(errno));
        rc = 1;
    }
    return rc;
}

/* mkdir -p */
static int make_dir(const char *dir)
{
    char p[4096];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p) return -1;
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            if (mkdir(p, 0777) && errno != EEXIST) return -1;
            *s = '/';
        }
    return mkdir(p, 0777) && errno != EEXIST ? -1 : 0;
}

int moe_cmd_help(int argc, char **argv)
{
    if (argc < 2) {
        moe_cli_usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--man-dir")) {
        if (argc != 3) {
            usage(stderr);
            return 2;
        }
        if (make_dir(argv[2])) {
            fprintf(stderr, "moe help: cannot create %s: %s\n", argv[2], strerror(errno));
            return 1;
        }
        int rc = write_page_file(argv[2], NULL);
        for (int i = 0; i < moe_cli_n_commands && !rc; i++) rc = write_page_file(argv[2], &moe_cli_commands[i]);
        return rc;
    }
    if (!strcmp(argv[1], "--man")) {
        if (argc == 2) return write_page(stdout, NULL);
        const moe_cli_command *c = find_command(argc - 2, argv + 2);
        return c ? write_page(stdout, c) : 2;
    }
    if (argv[1][0] == '-') {
        fprintf(stderr, "moe help: unknown option '%s'\n", argv[1]);
        usage(stderr);
        return 2;
    }
    const moe_cli_command *c = find_command(argc - 1, argv + 1);
    if (!c) return 2;
    char buf[256], *hargv[MAX_WORDS + 3];
    return moe_cli_dispatch(help_argv(hargv, buf, sizeof buf, c->words), hargv);
}
