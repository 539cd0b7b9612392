/* Config: defaults are valid, INI loading and command-line overrides, every
 * kind of bad input is refused with a detail naming the key or file, and
 * the INI writer round-trips through the loader. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "comm/comm.h"
#include "config/config.h"

/* Writes text to a fresh temporary file whose name goes to path. */
static void write_tmp(char path[64], const char *text)
{
    strcpy(path, "/tmp/moe_test_config_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Loads text over the defaults; returns the status, detail left in moe_error_detail. */
static moe_status load_text(moe_train_config *c, const char *text, char path[64])
{
    moe_train_config_default(c);
    write_tmp(path, text);
    moe_status st = moe_train_config_load(c, path);
    unlink(path);
    return st;
}

#define assert_detail_has(s) assert_non_null(strstr(moe_error_detail(), (s)))

static void test_defaults_valid(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    assert_int_equal(c.vocab_size, 256);
    assert_int_equal(c.normalize_topk, 1); /* top_k = 2 */
    /* No training file by default: the check says which key to set. */
    assert_int_equal(moe_train_config_check(&c, 1), MOE_ERR_ARG);
    assert_detail_has("data");
    strcpy(c.data, "corpus.txt");
    for (int world = 1; world <= 8; world *= 2) assert_int_equal(moe_train_config_check(&c, world), MOE_OK);
    assert_int_equal(moe_train_config_check(&c, 0), MOE_ERR_ARG);
}

static void test_load_and_overrides(void **state)
{
    (void)state;
    char path[64];
    moe_train_config c;
    const char *ini = "; a comment\n"
                      "# another\n"
                      "d_model = 64\n"
                      "[model]\n"
                      "  n_experts = 4   ; inline comment\n"
                      "router = expert_choice\n"
                      "activation = swiglu\n"
                      "[anything]\n"
                      "lr = 1e-3\n"
                      "seed = 4000000000\n"
                      "data = /data/my corpus.txt\n"
                      "a2a = shm\n"
                      "router_noise = gaussian\n"
                      "steps: 77\n";
    assert_int_equal(load_text(&c, ini, path), MOE_OK);
    assert_int_equal(c.d_model, 64);
    assert_int_equal(c.n_experts, 4);
    assert_int_equal(c.router, MOE_ROUTER_EXPERT_CHOICE);
    assert_int_equal(c.activation, MOE_ACT_SWIGLU);
    assert_true(c.lr == 1e-3);
    assert_int_equal(c.seed, 4000000000u);
    assert_string_equal(c.data, "/data/my corpus.txt");
    assert_int_equal(c.a2a, 1);
    assert_int_equal(c.router_noise, 1);
    assert_int_equal(c.steps, 77);
    assert_int_equal(c.n_layers, 4); /* untouched keys keep their defaults */
    /* The exchange was renamed: the old value still loads, the new one too,
     * and the writer uses the new name. */
    assert_int_equal(moe_train_config_set(&c, "a2a", "alltoallv"), MOE_OK);
    assert_int_equal(c.a2a, MOE_A2A_P2P);
    char text[8192];
    moe_train_config_format(&c, text, sizeof text);
    assert_non_null(strstr(text, "a2a = p2p\n"));
    assert_int_equal(moe_train_config_set(&c, "a2a", "shm"), MOE_OK);
    assert_int_equal(moe_train_config_set(&c, "a2a", "p2p"), MOE_OK);
    assert_int_equal(c.a2a, MOE_A2A_P2P);

    /* Command line: --config is applied first wherever it sits, then the
     * overrides in order; '-' reads as '_'. */
    write_tmp(path, "steps = 5\nlr = 0.5\n");
    char *argv[] = {"train", "--steps=10", "--lr", "0.01", "--config", path, "--warmup-steps", "3",
                    "--steps", "20", NULL};
    int help = -1;
    moe_train_config_default(&c);
    assert_int_equal(moe_train_config_parse_args(&c, 10, argv, &help), MOE_OK);
    assert_int_equal(help, 0);
    assert_int_equal(c.steps, 20);
    assert_true(c.lr == 0.01);
    assert_int_equal(c.warmup_steps, 3);
    unlink(path);

    char *argv_help[] = {"train", "--steps=oops", "--help", NULL};
    assert_int_equal(moe_train_config_parse_args(&c, 3, argv_help, &help), MOE_OK);
    assert_int_equal(help, 1);
}

static void test_normalize_topk_resolution(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    assert_int_equal(moe_train_config_set(&c, "top_k", "1"), MOE_OK);
    assert_int_equal(c.normalize_topk, 0); /* follows k when unset */
    assert_int_equal(moe_train_config_set(&c, "normalize_topk", "1"), MOE_OK);
    assert_int_equal(c.normalize_topk, 0); /* k = 1 forces 0 */
    assert_int_equal(moe_train_config_set(&c, "top_k", "2"), MOE_OK);
    assert_int_equal(c.normalize_topk, 1); /* the user's 1 comes back */
    assert_int_equal(moe_train_config_set(&c, "normalize_topk", "0"), MOE_OK);
    assert_int_equal(moe_train_config_set(&c, "top_k", "4"), MOE_OK);
    assert_int_equal(c.normalize_topk, 0); /* the user's 0 stays */
}

typedef struct {
    const char *ini;
    const char *detail[3]; /* substrings the detail must contain */
} bad_case;

static void test_bad_files(void **state)
{
    (void)state;
    const bad_case cases[] = {
        {"steps = 10\ntopk = 2\n", {":2: ", "unknown key 'topk'", "top_k"}},
        {"top_k = abc\n", {":1: ", "top_k: expected an integer >= 1", "'abc'"}},
        {"lr = fast\n", {":1: ", "lr: expected a number > 0", "'fast'"}},
        {"\n\nsteps = 10x\n", {":3: ", "steps", "'10x'"}},
        {"lr = 0.1abc\n", {"lr", "'0.1abc'"}},
        {"d_model = 1.5\n", {"d_model", "'1.5'"}},
        {"d_model = \n", {"d_model", "''"}},
        {"top_k = 0\n", {"top_k", ">= 1", "'0'"}},
        {"beta1 = 1\n", {"beta1", "[0, 1)", "'1'"}},
        {"lr = nan\n", {"lr", "'nan'"}},
        {"lr = inf\n", {"lr", "'inf'"}},
        {"vocab_size = 255\n", {"vocab_size", "[256, 16777216]", "'255'"}},
        {"vocab_size = 16777217\n", {"vocab_size", "16777216", "'16777217'"}},
        {"data_format = text\n", {"data_format", "auto, bytes or tokens", "'text'"}},
        {"tokenizer = a;b\n", {"tokenizer", "without ';'"}},
        {"d_model = 99999999999\n", {"d_model", "'99999999999'"}},
        {"seed = -1\n", {"seed", "'-1'"}},
        {"router = best\n", {"router", "token_choice or expert_choice", "'best'"}},
        {"activation = tanh\n", {"activation", "gelu, relu or swiglu"}},
        {"router_noise = yes\n", {"router_noise", "none or gaussian"}},
        {"a2a = nccl\n", {"a2a", "p2p, shm, node or auto"}},
        {"normalize_topk = 2\n", {"normalize_topk", "'2'"}},
        {"steps = 5\nlr = 0.1\nsteps = 6\n", {":3: ", "steps: set twice (first on line 1)"}},
        {"steps 10\n", {":1: ", "syntax error"}},
        {"[model\n", {":1: ", "syntax error"}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_train_config c;
        char path[64];
        moe_status st = load_text(&c, cases[i].ini, path);
        if (st != MOE_ERR_ARG) fail_msg("case %zu '%s': status %d", i, cases[i].ini, st);
        assert_detail_has(path);
        for (int j = 0; j < 3 && cases[i].detail[j]; j++)
            if (!strstr(moe_error_detail(), cases[i].detail[j]))
                fail_msg("case %zu: detail '%s' lacks '%s'", i, moe_error_detail(), cases[i].detail[j]);
    }
}

static void test_line_too_long(void **state)
{
    (void)state;
    char text[4096], path[64];
    moe_train_config c;
    snprintf(text, sizeof text, "steps = 3\ndata = /%0*d\nlr = 0.1\n", 3000, 7);
    assert_int_equal(load_text(&c, text, path), MOE_ERR_ARG);
    assert_detail_has(":2: line longer than");
}

static void test_set_leaves_config_unchanged_on_error(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    assert_int_equal(moe_train_config_set(&c, "top_k", "3x"), MOE_ERR_ARG);
    assert_int_equal(c.top_k, 2);
    assert_int_equal(moe_train_config_set(&c, "top_k", " 3"), MOE_ERR_ARG);
    assert_int_equal(moe_train_config_set(&c, "top_k", "+3"), MOE_ERR_ARG);
    assert_int_equal(moe_train_config_set(&c, "data", "a;b"), MOE_ERR_ARG);
    assert_detail_has("data");
    assert_int_equal(moe_train_config_set(&c, "no_such_key", "1"), MOE_ERR_ARG);
    assert_detail_has("no_such_key");
}

static void test_missing_file(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    assert_int_equal(moe_train_config_load(&c, "/nonexistent/moe.ini"), MOE_ERR_IO);
    assert_detail_has("/nonexistent/moe.ini");
    char *argv[] = {"train", "--config", "/nonexistent/moe.ini", NULL};
    int help;
    assert_int_equal(moe_train_config_parse_args(&c, 3, argv, &help), MOE_ERR_IO);
    assert_detail_has("/nonexistent/moe.ini");
}

static void test_bad_args(void **state)
{
    (void)state;
    moe_train_config c;
    int help;
    struct {
        int argc;
        char *argv[4];
        const char *detail;
    } cases[] = {
        {2, {"train", "--bogus=1"}, "unknown key 'bogus'"},
        {2, {"train", "--steps"}, "--steps needs a value"},
        {3, {"train", "--steps", "--lr=1"}, "--steps needs a value"},
        {2, {"train", "stray"}, "unexpected argument 'stray'"},
        {2, {"train", "--top_k=abc"}, "top_k: expected an integer"},
        {3, {"train", "--lr", "-1"}, "lr: expected a number > 0, got '-1'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_train_config_default(&c);
        assert_int_equal(moe_train_config_parse_args(&c, cases[i].argc, cases[i].argv, &help), MOE_ERR_ARG);
        if (!strstr(moe_error_detail(), cases[i].detail))
            fail_msg("case %zu: detail '%s' lacks '%s'", i, moe_error_detail(), cases[i].detail);
    }
}

/* Cross-field rules: each broken rule is refused, naming the key(s). */
static void test_check_rules(void **state)
{
    (void)state;
    struct {
        const char *key, *value;
        int world;
        const char *detail;
    } cases[] = {
        {"top_k", "9", 1, "top_k=9 exceeds n_experts=8"},
        {"n_heads", "3", 1, "n_heads=3 does not divide d_model=128"},
        {"batch_size", "10", 4, "batch_size=10 is not divisible by the 4 ranks"},
        {"group_seqs", "3", 2, "group_seqs=3"},
        {"n_experts", "6", 4, "n_experts=6 is not divisible by ep_size=4"},
        {"ep_size", "3", 4, "ep_size=3 does not divide the 4 ranks"},
        {"ep_size", "8", 4, "ep_size=8"},
        {"val_frac", "0", 1, "val_every"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_train_config c;
        moe_train_config_default(&c);
        strcpy(c.data, "x");
        assert_int_equal(moe_train_config_check(&c, cases[i].world), MOE_OK);
        assert_int_equal(moe_train_config_set(&c, cases[i].key, cases[i].value), MOE_OK);
        assert_int_equal(moe_train_config_check(&c, cases[i].world), MOE_ERR_ARG);
        if (!strstr(moe_error_detail(), cases[i].detail))
            fail_msg("case %zu: detail '%s' lacks '%s'", i, moe_error_detail(), cases[i].detail);
    }
    /* top_k is ignored by expert choice, whose capacity_factor must be > 0. */
    moe_train_config c;
    moe_train_config_default(&c);
    strcpy(c.data, "x");
    assert_int_equal(moe_train_config_set(&c, "router", "expert_choice"), MOE_OK);
    assert_int_equal(moe_train_config_set(&c, "top_k", "9"), MOE_OK);
    assert_int_equal(moe_train_config_check(&c, 1), MOE_OK);
    assert_int_equal(moe_train_config_set(&c, "capacity_factor", "0"), MOE_OK);
    assert_int_equal(moe_train_config_check(&c, 1), MOE_ERR_ARG);
    assert_detail_has("capacity_factor");
    /* A configuration built in code is range-checked too. */
    moe_train_config_default(&c);
    strcpy(c.data, "x");
    c.lr = -1;
    assert_int_equal(moe_train_config_check(&c, 1), MOE_ERR_ARG);
    assert_detail_has("lr");
    moe_train_config_default(&c);
    strcpy(c.data, "x");
    c.activation = (moe_activation)7;
    assert_int_equal(moe_train_config_check(&c, 1), MOE_ERR_ARG);
    assert_detail_has("activation");
}

static void test_format_round_trip(void **state)
{
    (void)state;
    moe_train_config a, b;
    moe_train_config_default(&a);
    const char *set[][2] = {{"d_model", "96"},        {"top_k", "1"},           {"router", "expert_choice"},
                            {"capacity_factor", "2"}, {"activation", "relu"},   {"lr", "0.0007"},
                            {"ln_eps", "1e-6"},       {"adam_eps", "1e-08"},    {"beta2", "0.999"},
                            {"seed", "4294967295"},   {"data", "/tmp/a b.txt"}, {"val_data", ""},
                            {"out_dir", "runs/x"},    {"a2a", "shm"},           {"min_lr_frac", "0.3333333333333333"},
                            {"resume", "runs/x/ckpt_000100.h5"}};
    for (size_t i = 0; i < sizeof set / sizeof set[0]; i++)
        assert_int_equal(moe_train_config_set(&a, set[i][0], set[i][1]), MOE_OK);
    char text[8192], text2[8192], path[64];
    int len = moe_train_config_format(&a, text, sizeof text);
    assert_true(len > 0 && len < (int)sizeof text);
    assert_int_equal(load_text(&b, text, path), MOE_OK);
    assert_int_equal(moe_train_config_format(&b, text2, sizeof text2), len);
    assert_string_equal(text, text2);
    assert_true(b.lr == a.lr && b.min_lr_frac == a.min_lr_frac && b.ln_eps == a.ln_eps);
    assert_int_equal(b.seed, a.seed);
    assert_int_equal(b.router, a.router);
    assert_int_equal(b.normalize_topk, 0);
    assert_string_equal(b.data, a.data);
    assert_string_equal(b.resume, a.resume);

    /* snprintf semantics: full length returned, buffer truncated and terminated. */
    char small[32];
    assert_int_equal(moe_train_config_format(&a, small, sizeof small), len);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_int_equal(moe_train_config_format(&a, NULL, 0), len);
}

/* Every key written by format has a line in --help. */
static void test_help_lists_every_key(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    char text[8192], help[16384];
    moe_train_config_format(&c, text, sizeof text);
    FILE *f = fmemopen(help, sizeof help, "w");
    assert_non_null(f);
    moe_train_config_help(f);
    fclose(f);
    int n_keys = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strstr(line, " = ");
        if (!eq) continue;
        char want[80];
        snprintf(want, sizeof want, "\n  %.*s ", (int)(eq - line), line);
        if (!strstr(help, want)) fail_msg("help lacks key '%.*s'", (int)(eq - line), line);
        n_keys++;
    }
    assert_int_equal(n_keys, 73); /* every key of the table */
}

/* vocab_size follows the data unless set; a value set must hold the
 * data's ids; the resolved value survives the INI text (checkpoints). */
static void test_vocab_resolution(void **state)
{
    (void)state;
    moe_train_config c, back;
    moe_train_config_default(&c);
    assert_int_equal(c.vocab_size, 256);
    assert_int_equal(moe_train_config_resolve_vocab(&c, 50257, "tokenizer 'gpt2.json'"), MOE_OK);
    assert_int_equal(c.vocab_size, 50257);
    char text[16384];
    moe_train_config_format(&c, text, sizeof text);
    moe_train_config_default(&back);
    assert_int_equal(moe_train_config_load_text(&back, text, "ckpt:config"), MOE_OK);
    assert_int_equal(back.vocab_size, 50257);
    assert_int_equal(moe_train_config_resolve_vocab(&back, 50257, "x"), MOE_OK); /* as saved */
    assert_int_equal(moe_train_config_resolve_vocab(&back, 50000, "x"), MOE_OK); /* larger than the data is fine */
    assert_int_equal(back.vocab_size, 50257);
    moe_train_config_default(&c);
    assert_int_equal(moe_train_config_set(&c, "vocab_size", "4096"), MOE_OK);
    assert_int_equal(moe_train_config_resolve_vocab(&c, 256, "the byte data 'x.txt'"), MOE_OK);
    assert_int_equal(c.vocab_size, 4096);
    assert_int_equal(moe_train_config_resolve_vocab(&c, 5000, "tokenizer 't.json'"), MOE_ERR_ARG);
    assert_detail_has("vocab_size=4096");
    assert_detail_has("5000 ids of tokenizer 't.json'");
    assert_int_equal(c.vocab_size, 4096);
    moe_train_config_default(&c); /* not set, and the data is outside the key's range */
    assert_int_equal(moe_train_config_resolve_vocab(&c, (1 << 24) + 1, "t"), MOE_ERR_ARG);
    assert_int_equal(moe_train_config_set(&c, "data_format", "tokens"), MOE_OK);
    assert_int_equal(c.data_format, 2);
    assert_int_equal(moe_train_config_set(&c, "tokenizer", "runs/tok.json"), MOE_OK);
    assert_string_equal(c.tokenizer, "runs/tok.json");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_valid),
        cmocka_unit_test(test_load_and_overrides),
        cmocka_unit_test(test_normalize_topk_resolution),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_line_too_long),
        cmocka_unit_test(test_set_leaves_config_unchanged_on_error),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_bad_args),
        cmocka_unit_test(test_check_rules),
        cmocka_unit_test(test_format_round_trip),
        cmocka_unit_test(test_help_lists_every_key),
        cmocka_unit_test(test_vocab_resolution),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
