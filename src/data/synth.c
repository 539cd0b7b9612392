/* The built-in synthetic corpus: documents of one domain each (arithmetic,
 * string operations, a small English grammar, key-value records, C-like
 * code, Roman numerals, dates), so that experts have something to
 * specialise on and the per-domain loss shows what a model learned. Every
 * line is correct (sums add up, reversals reverse), so a model can learn
 * rules, not only surface statistics. Randomness: data.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "data/data.h"

enum { D_ARITH, D_STRINGS, D_ENGLISH, D_RECORDS, D_CODE, D_ROMAN, D_DATES, N_DOMAINS };

static const char *const domain_names[N_DOMAINS] = {"arith", "strings", "english", "records",
                                                    "code",  "roman",   "dates"};

int moe_data_n_domains(void) { return N_DOMAINS; }

const char *moe_data_domain_name(int i) { return i >= 0 && i < N_DOMAINS ? domain_names[i] : NULL; }

/* Draw i of the corpus stream: a counter, so the corpus is a pure function of seed. */
typedef struct {
    uint32_t seed;
    uint64_t draw;
} gen;

/* Uniform integer in [0, n), n >= 1. */
static int below(gen *g, int n)
{
    double u = moe_rng_uniform(g->seed, MOE_RNG_DATA, (uint32_t)g->draw, (uint32_t)(g->draw >> 32), 0,
                               MOE_DATA_CTR_SYNTH);
    g->draw++;
    int v = (int)(u * n);
    return v < n ? v : n - 1;
}

/* Uniform integer in [lo, hi]. */
static int range(gen *g, int lo, int hi) { return lo + below(g, hi - lo + 1); }

#define PICK(g, arr) ((arr)[below(g, (int)(sizeof(arr) / sizeof((arr)[0])))])

/* Every line generator writes one line with its '\n' into buf (LINE_MAX
 * bytes are enough for any of them) and returns its length. */
enum { LINE_MAX_BYTES = 160, DOC_MIN_BYTES = 192, DOC_MAX_BYTES = 640 };

static int line_arith(gen *g, char *buf)
{
    int op = below(g, 3);
    if (op == 0) {
        int a = range(g, 0, 99), b = range(g, 0, 99);
        return sprintf(buf, "%d+%d=%d\n", a, b, a + b);
    }
    if (op == 1) {
        int a = range(g, 0, 99), b = range(g, 0, a);
        return sprintf(buf, "%d-%d=%d\n", a, b, a - b);
    }
    int a = range(g, 0, 12), b = range(g, 0, 12);
    return sprintf(buf, "%d*%d=%d\n", a, b, a * b);
}

static int cmp_char(const void *a, const void *b) { return *(const char *)a - *(const char *)b; }

static int line_strings(gen *g, char *buf)
{
    static const char *const ops[] = {"rev", "sort", "upper"};
    char w[16], r[16];
    int n = range(g, 3, 8), op = below(g, 3);
    for (int i = 0; i < n; i++) w[i] = (char)('a' + below(g, 26));
    w[n] = '\0';
    for (int i = 0; i < n; i++) r[i] = op == 0 ? w[n - 1 - i] : op == 2 ? (char)(w[i] - 'a' + 'A') : w[i];
    r[n] = '\0';
    if (op == 1) qsort(r, (size_t)n, 1, cmp_char);
    return sprintf(buf, "%s: %s -> %s\n", ops[op], w, r);
}

/* Noun phrase: determiner, optional adjective, noun, agreeing in number;
 * "a" becomes "an" before a vowel. Returns the length written. */
static int noun_phrase(gen *g, char *buf, int plural, const char *const (*nouns)[2], int n_nouns)
{
    static const char *const det_sing[] = {"the", "a", "this", "every", "one"};
    static const char *const det_plur[] = {"the", "two", "some", "many", "these"};
    static const char *const adj[] = {"small", "big", "red", "blue", "old", "young", "happy", "quiet", "green", "odd"};
    const char *det = plural ? PICK(g, det_plur) : PICK(g, det_sing);
    const char *a = below(g, 2) ? PICK(g, adj) : NULL;
    const char *noun = nouns[below(g, n_nouns)][plural];
    const char *next = a ? a : noun;
    if (!strcmp(det, "a") && strchr("aeiou", next[0])) det = "an";
    return a ? sprintf(buf, "%s %s %s", det, a, noun) : sprintf(buf, "%s %s", det, noun);
}

static int line_english(gen *g, char *buf)
{
    static const char *const agents[][2] = {
        {"cat", "cats"}, {"dog", "dogs"}, {"bird", "birds"}, {"child", "children"}, {"fox", "foxes"},
        {"teacher", "teachers"}, {"farmer", "farmers"}, {"girl", "girls"}, {"boy", "boys"}, {"mouse", "mice"}};
    static const char *const things[][2] = {
        {"ball", "balls"}, {"book", "books"}, {"apple", "apples"}, {"box", "boxes"}, {"kite", "kites"},
        {"tree", "trees"}, {"letter", "letters"}, {"egg", "eggs"}};
    static const char *const verbs[][2] = {/* {third person singular, plural} */
        {"sees", "see"}, {"likes", "like"}, {"chases", "chase"}, {"finds", "find"}, {"carries", "carry"},
        {"watches", "watch"}, {"wants", "want"}, {"draws", "draw"}};
    static const char *const places[] = {"near the river", "in the garden", "at night", "after school",
                                         "on the hill"};
    int subj_plural = below(g, 2), obj_plural = below(g, 2);
    int len = noun_phrase(g, buf, subj_plural, agents, (int)(sizeof agents / sizeof agents[0]));
    len += sprintf(buf + len, " %s ", verbs[below(g, (int)(sizeof verbs / sizeof verbs[0]))][subj_plural]);
    len += noun_phrase(g, buf + len, obj_plural, things, (int)(sizeof things / sizeof things[0]));
    if (below(g, 3) == 0) len += sprintf(buf + len, " %s", PICK(g, places));
    return len + sprintf(buf + len, ".\n");
}

static int line_records(gen *g, char *buf)
{
    static const char *const names[] = {"lena", "omar", "ines", "paul", "mika", "sara", "ivan", "noor",
                                        "jonas", "ada", "yuki", "karl", "zoe", "amir", "lars", "rosa"};
    static const char *const cities[] = {"oslo", "lima", "rome", "kyiv", "cairo", "lagos", "delhi", "quito",
                                         "bern", "riga", "tunis", "hanoi", "perth", "porto", "seoul", "dakar"};
    int id = range(g, 1000, 9999);
    const char *name = PICK(g, names), *city = PICK(g, cities);
    return sprintf(buf, "{id: %d, name: %s, city: %s, age: %d}\n", id, name, city, range(g, 18, 90));
}

static int line_code(gen *g, char *buf)
{
    static const char *const vars[] = {"a", "b", "c", "x", "y", "n", "sum", "tmp"};
    static const char ops[] = {'+', '-', '*'};
    static const char *const cmps[] = {"<", ">", "==", "!="};
    const char *v = PICK(g, vars), *w = PICK(g, vars);
    switch (below(g, 5)) {
    case 0: return sprintf(buf, "%s = %s %c %d;\n", v, w, PICK(g, ops), range(g, 1, 20));
    case 1:
        return sprintf(buf, "if (%s %s %d) %s = %s %c %d;\n", v, PICK(g, cmps), range(g, 0, 50), w, v,
                       PICK(g, ops), range(g, 1, 9));
    case 2: return sprintf(buf, "for (i = 0; i < %d; i++) %s += i;\n", range(g, 2, 16), v);
    case 3: return sprintf(buf, "while (%s > 0) %s = %s - %d;\n", v, v, v, range(g, 1, 5));
    default: return sprintf(buf, "return f(%s, %d);\n", v, range(g, 0, 99));
    }
}

static int roman(char *buf, int v)
{
    static const int val[] = {1000, 900, 500, 400, 100, 90, 50, 40, 10, 9, 5, 4, 1};
    static const char *const sym[] = {"M", "CM", "D", "CD", "C", "XC", "L", "XL", "X", "IX", "V", "IV", "I"};
    int len = 0;
    for (int i = 0; i < 13; i++)
        for (; v >= val[i]; v -= val[i]) len += sprintf(buf + len, "%s", sym[i]);
    return len;
}

static int line_roman(gen *g, char *buf)
{
    /* Half small numbers, so the frequent symbols are well covered. */
    int v = below(g, 2) ? range(g, 1, 100) : range(g, 1, 3999);
    int len = sprintf(buf, "roman %d = ", v);
    len += roman(buf + len, v);
    return len + sprintf(buf + len, "\n");
}

static int line_dates(gen *g, char *buf)
{
    static const char *const months[] = {"january", "february", "march",     "april",   "may",      "june",
                                         "july",    "august",   "september", "october", "november", "december"};
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y = range(g, 1900, 2099), m = range(g, 1, 12);
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    int d = range(g, 1, mdays[m - 1] + (m == 2 && leap));
    return sprintf(buf, "%04d-%02d-%02d = %s %d, %d\n", y, m, d, months[m - 1], d, y);
}

static int (*const line_fn[N_DOMAINS])(gen *, char *) = {line_arith, line_strings, line_english, line_records,
                                                        line_code,  line_roman,   line_dates};

moe_status moe_data_synth(uint8_t *text, uint8_t *domain, size_t n, uint32_t seed)
{
    if (n && !text) return moe_errorf(MOE_ERR_ARG, "moe_data_synth: NULL text buffer for %zu bytes", n);
    gen g = {seed, 0};
    char line[LINE_MAX_BYTES];
    size_t pos = 0;
    while (pos < n) {
        /* A document is whole lines of one domain until it holds at least
         * `target` bytes: a byte budget, not a line count, so every domain
         * gets about the same share of the corpus whatever its line length. */
        int d = below(&g, N_DOMAINS), target = range(&g, DOC_MIN_BYTES, DOC_MAX_BYTES);
        for (int doc = 0, first = 1; doc < target && pos < n; first = 0) {
            /* Every document but the corpus's first starts with an empty line. */
            int len = first && pos ? sprintf(line, "\n") : line_fn[d](&g, line);
            size_t take = (size_t)len < n - pos ? (size_t)len : n - pos;
            memcpy(text + pos, line, take);
            if (domain) memset(domain + pos, d, take);
            pos += take;
            doc += len;
        }
    }
    return MOE_OK;
}
