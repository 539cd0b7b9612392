/* config.json of the Hugging Face MoE types as moerun configurations
 * (src/convert/hf.c): every key set from the type and the config (not
 * moerun's defaults), the readings of docs/convert.md, every unsupported
 * field refused naming it, malformed JSON and fields of the wrong type
 * refused as format errors, and the exported config.json parsed back to
 * the same model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cjson/cJSON.h>

#include "convert/hf.h"

/* A tiny config of each type (the fields transformers' classes read). */
static const char *const base[MOE_HF_TYPE_COUNT] = {
    "{\"model_type\": \"mixtral\", \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
    " \"num_key_value_heads\": 2, \"vocab_size\": 300, \"max_position_embeddings\": 32768, \"intermediate_size\": 96,"
    " \"num_local_experts\": 8, \"num_experts_per_tok\": 2, \"rms_norm_eps\": 1e-05, \"rope_theta\": 1000000.0,"
    " \"sliding_window\": null, \"router_jitter_noise\": 0.0, \"tie_word_embeddings\": false, \"hidden_act\": \"silu\","
    " \"output_router_logits\": true, \"router_aux_loss_coef\": 0.02}",
    "{\"model_type\": \"qwen2_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
    " \"num_key_value_heads\": 4, \"vocab_size\": 300, \"max_position_embeddings\": 64, \"intermediate_size\": 96,"
    " \"moe_intermediate_size\": 48, \"shared_expert_intermediate_size\": 128, \"num_experts\": 8,"
    " \"num_experts_per_tok\": 4, \"norm_topk_prob\": false, \"decoder_sparse_step\": 1, \"mlp_only_layers\": [],"
    " \"use_sliding_window\": false, \"sliding_window\": 4096, \"rope_theta\": 1000000.0, \"rms_norm_eps\": 1e-06,"
    " \"tie_word_embeddings\": true}",
    "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
    " \"num_key_value_heads\": 2, \"head_dim\": 32, \"vocab_size\": 300, \"max_position_embeddings\": 64,"
    " \"moe_intermediate_size\": 48, \"num_experts\": 8, \"num_experts_per_tok\": 2, \"norm_topk_prob\": true,"
    " \"attention_bias\": false, \"use_sliding_window\": false, \"sliding_window\": null,"
    " \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 5000.0}}",
    "{\"model_type\": \"olmoe\", \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
    " \"vocab_size\": 300, \"max_position_embeddings\": 64, \"intermediate_size\": 48, \"num_experts\": 8,"
    " \"num_experts_per_tok\": 2, \"norm_topk_prob\": false, \"attention_bias\": false, \"clip_qkv\": null,"
    " \"head_dim\": 999}",
};

/* base[t] with the fields of `extra` (", \"field\": value, ...") set
 * (replacing the base's), parsed. */
static moe_status parse(moe_train_config *c, moe_hf_type *t, int type, const char *extra, int cap)
{
    cJSON *b = cJSON_Parse(base[type]);
    char ex[1024];
    snprintf(ex, sizeof ex, "{%s}", extra[0] == ',' ? extra + 1 : extra);
    cJSON *e = cJSON_Parse(ex);
    assert_non_null(b);
    assert_non_null(e);
    while (e->child) {
        cJSON *item = cJSON_DetachItemViaPointer(e, e->child);
        cJSON_DeleteItemFromObjectCaseSensitive(b, item->string);
        cJSON_AddItemToObject(b, item->string, item);
    }
    char *json = cJSON_PrintUnformatted(b);
    cJSON_Delete(b);
    cJSON_Delete(e);
    const moe_status st = moe_hf_config_parse(c, t, json, strlen(json), "m/config.json", cap);
    cJSON_free(json);
    return st;
}

static void test_types(void **state)
{
    (void)state;
    moe_train_config c;
    moe_hf_type t;
    /* Mixtral: top-k always renormalised; its aux coefficient scaled by k; seq_len capped */
    assert_int_equal(parse(&c, &t, MOE_HF_MIXTRAL, "", 4096), MOE_OK);
    assert_int_equal(t, MOE_HF_MIXTRAL);
    assert_int_equal(c.vocab_size, 300);
    assert_int_equal(c.d_model, 64);
    assert_int_equal(c.n_kv_heads, 2);
    assert_int_equal(moe_cfg_head_dim(&c), 16);
    assert_int_equal(c.seq_len, 4096);
    assert_int_equal(c.d_ff, 96);
    assert_int_equal(c.n_experts, 8);
    assert_int_equal(c.normalize_topk, 1);
    assert_int_equal(c.tie_embeddings, 0);
    assert_true(c.capacity_factor == 0.0); /* dropless, not moerun's 1.25 */
    assert_int_equal(c.norm, MOE_NORM_RMSNORM);
    assert_int_equal(c.pos, MOE_POS_ROPE);
    assert_true(c.rope_theta == 1e6 && c.ln_eps == 1e-5);
    assert_int_equal(c.activation, MOE_ACT_SWIGLU);
    assert_int_equal(c.linear_bias, 0);
    assert_int_equal(moe_cfg_attn_bias(&c), 0);
    assert_int_equal(c.qk_norm, MOE_QK_NORM_NONE);
    assert_int_equal(c.moe_every, 1);
    assert_true(c.aux_loss_coef == 2 * 0.02 && c.z_loss_coef == 0.0);
    /* Qwen2-MoE: its shared expert and gate, q, k, v biases, tied embeddings, no renormalisation */
    assert_int_equal(parse(&c, &t, MOE_HF_QWEN2_MOE, "", 4096), MOE_OK);
    assert_int_equal(c.seq_len, 64);
    assert_int_equal(c.d_ff, 48); /* moe_intermediate_size, not intermediate_size */
    assert_int_equal(c.top_k, 4);
    assert_int_equal(c.normalize_topk, 0);
    assert_int_equal(c.n_shared, 1);
    assert_int_equal(moe_cfg_d_ff_shared(&c), 128);
    assert_int_equal(c.shared_gate, 1);
    assert_int_equal(moe_cfg_attn_bias(&c), 1);
    assert_int_equal(c.tie_embeddings, 1);
    assert_true(c.ln_eps == 1e-6 && c.aux_loss_coef == 0.0); /* output_router_logits false */
    /* Qwen3-MoE: per-head q/k norm, head_dim != d/H, transformers 5's rope_parameters */
    assert_int_equal(parse(&c, &t, MOE_HF_QWEN3_MOE, "", 4096), MOE_OK);
    assert_int_equal(c.qk_norm, MOE_QK_NORM_HEAD);
    assert_int_equal(moe_cfg_head_dim(&c), 32);
    assert_true(c.rope_theta == 5000.0);
    assert_int_equal(c.normalize_topk, 1);
    assert_true(c.ln_eps == 1e-6); /* the class default */
    /* OLMoE: full-width q/k norm; head_dim is ignored as transformers does; num_key_value_heads defaults to heads */
    assert_int_equal(parse(&c, &t, MOE_HF_OLMOE, "", 4096), MOE_OK);
    assert_int_equal(c.qk_norm, MOE_QK_NORM_FULL);
    assert_int_equal(moe_cfg_head_dim(&c), 16);
    assert_int_equal(moe_cfg_kv_heads(&c), 4);
    assert_true(c.rope_theta == 10000.0 && c.ln_eps == 1e-5);
    /* a user cap below max_position_embeddings */
    assert_int_equal(parse(&c, &t, MOE_HF_MIXTRAL, "", 128), MOE_OK);
    assert_int_equal(c.seq_len, 128);
    assert_int_equal(moe_train_config_check_model(&c), MOE_OK);
}

/* Each case: a type, an extra field (or a replacement), the status and a
 * piece of the message that names the field. */
static void test_refused(void **state)
{
    (void)state;
    const struct {
        int type;
        const char *extra;
        moe_status st;
        const char *names;
    } cases[] = {
        {MOE_HF_MIXTRAL, ", \"sliding_window\": 4096", MOE_ERR_ARG, "sliding_window"},
        {MOE_HF_MIXTRAL, ", \"router_jitter_noise\": 0.01", MOE_ERR_ARG, "router_jitter_noise"},
        {MOE_HF_MIXTRAL, ", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}", MOE_ERR_ARG, "rope_scaling"},
        {MOE_HF_MIXTRAL, ", \"partial_rotary_factor\": 0.5", MOE_ERR_ARG, "partial_rotary_factor"},
        {MOE_HF_QWEN3_MOE, ", \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4}", MOE_ERR_ARG, "rope_type"},
        {MOE_HF_MIXTRAL, ", \"kv_lora_rank\": 512", MOE_ERR_ARG, "kv_lora_rank"},
        {MOE_HF_MIXTRAL, ", \"hidden_act\": \"gelu\"", MOE_ERR_ARG, "hidden_act"},
        {MOE_HF_MIXTRAL, ", \"num_experts_per_tok\": 9", MOE_ERR_ARG, "num_experts_per_tok"},
        {MOE_HF_MIXTRAL, ", \"num_experts_per_tok\": 1", MOE_ERR_ARG, "num_experts_per_tok"},
        {MOE_HF_QWEN2_MOE, ", \"use_sliding_window\": true", MOE_ERR_ARG, "use_sliding_window"},
        {MOE_HF_QWEN2_MOE, ", \"decoder_sparse_step\": 2", MOE_ERR_ARG, "decoder_sparse_step"},
        {MOE_HF_QWEN2_MOE, ", \"mlp_only_layers\": [1]", MOE_ERR_ARG, "mlp_only_layers"},
        {MOE_HF_QWEN2_MOE, ", \"shared_expert_intermediate_size\": 0", MOE_ERR_ARG, "shared_expert_intermediate_size"},
        {MOE_HF_QWEN3_MOE, ", \"attention_bias\": true", MOE_ERR_ARG, "attention_bias"},
        {MOE_HF_OLMOE, ", \"attention_bias\": true", MOE_ERR_ARG, "attention_bias"},
        {MOE_HF_OLMOE, ", \"clip_qkv\": 8.0", MOE_ERR_ARG, "clip_qkv"},
        {MOE_HF_OLMOE, ", \"num_experts\": 0", MOE_ERR_ARG, "num_experts"},
        /* wrong types and malformed values */
        {MOE_HF_MIXTRAL, ", \"hidden_size\": \"64\"", MOE_ERR_FORMAT, "hidden_size"},
        {MOE_HF_MIXTRAL, ", \"num_hidden_layers\": 2.5", MOE_ERR_FORMAT, "num_hidden_layers"},
        {MOE_HF_MIXTRAL, ", \"num_hidden_layers\": -2", MOE_ERR_ARG, "num_hidden_layers"},
        {MOE_HF_MIXTRAL, ", \"num_hidden_layers\": 1e300", MOE_ERR_FORMAT, "num_hidden_layers"},
        {MOE_HF_MIXTRAL, ", \"tie_word_embeddings\": 1", MOE_ERR_FORMAT, "tie_word_embeddings"},
        {MOE_HF_MIXTRAL, ", \"rms_norm_eps\": \"1e-5\"", MOE_ERR_FORMAT, "rms_norm_eps"},
        {MOE_HF_OLMOE, ", \"num_attention_heads\": 5", MOE_ERR_ARG, "num_attention_heads"},
        {MOE_HF_MIXTRAL, ", \"num_attention_heads\": 3", MOE_ERR_ARG, "num_attention_heads"},
        {MOE_HF_MIXTRAL, ", \"num_key_value_heads\": 3", MOE_ERR_ARG, "n_kv_heads"},
        {MOE_HF_MIXTRAL, ", \"hidden_size\": 100000000", MOE_ERR_ARG, "d_model"},
    };
    moe_train_config c;
    moe_hf_type t;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const moe_status st = parse(&c, &t, cases[i].type, cases[i].extra, 4096);
        if (st != cases[i].st || !strstr(moe_error_detail(), cases[i].names) ||
            !strstr(moe_error_detail(), "m/config.json"))
            fail_msg("case %zu (%s): status %d, detail '%s'", i, cases[i].extra, (int)st, moe_error_detail());
    }
}

static void test_not_a_model(void **state)
{
    (void)state;
    moe_train_config c;
    moe_hf_type t;
    const struct {
        const char *json;
        moe_status st;
        const char *names;
    } cases[] = {
        {"", MOE_ERR_FORMAT, "not valid JSON"},
        {"{\"model_type\": \"mixtral\",", MOE_ERR_FORMAT, "not valid JSON"},
        {"[1, 2]", MOE_ERR_FORMAT, "not a JSON object"},
        {"{} trailing", MOE_ERR_FORMAT, "not valid JSON"},
        {"{\"hidden_size\": 64}", MOE_ERR_FORMAT, "'model_type' is missing"},
        {"{\"model_type\": 7}", MOE_ERR_FORMAT, "'model_type' must be a string"},
        {"{\"model_type\": \"llama\"}", MOE_ERR_ARG, "model_type 'llama' is not supported"},
        {"{\"model_type\": \"deepseek_v3\"}", MOE_ERR_ARG, "MLA"},
        {"{\"model_type\": \"mixtral\", \"hidden_size\": 64}", MOE_ERR_FORMAT, "'num_hidden_layers' is missing"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const moe_status st = moe_hf_config_parse(&c, &t, cases[i].json, strlen(cases[i].json), "m/config.json", 64);
        if (st != cases[i].st || !strstr(moe_error_detail(), cases[i].names))
            fail_msg("case %zu: status %d, detail '%s'", i, (int)st, moe_error_detail());
    }
    const char dup[] = "{\"model_type\": \"mixtral\", \"hidden_size\": 64, \"hidden_size\": 32}";
    assert_int_equal(moe_hf_config_parse(&c, &t, dup, sizeof dup - 1, "m/config.json", 64), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "'hidden_size' appears twice"));
    const char nul[] = "{\"model_type\": \"mix\0tral\"}";
    assert_int_equal(moe_hf_config_parse(&c, &t, nul, sizeof nul - 1, "m/config.json", 64), MOE_ERR_FORMAT);
}

/* The exported config.json describes the same model. */
static void test_write_parse_back(void **state)
{
    (void)state;
    for (int type = 0; type < MOE_HF_TYPE_COUNT; type++) {
        moe_train_config a, b;
        moe_hf_type t, t2;
        assert_int_equal(parse(&a, &t, type, "", 4096), MOE_OK);
        moe_hf_type dflt;
        assert_int_equal(moe_hf_type_for(&dflt, &a), MOE_OK);
        assert_int_equal(dflt, t);
        char *json;
        size_t n;
        assert_int_equal(moe_hf_config_write(&json, &n, &a, t), MOE_OK);
        assert_int_equal(moe_hf_config_parse(&b, &t2, json, n, "exported", 1 << 20), MOE_OK);
        free(json);
        assert_int_equal(t2, t);
        moe_model_attr x[MOE_MODEL_ATTRS_MAX], y[MOE_MODEL_ATTRS_MAX];
        const int na = moe_train_config_model_attrs(&a, x, MOE_MODEL_ATTRS_MAX);
        moe_train_config_model_attrs(&b, y, MOE_MODEL_ATTRS_MAX);
        for (int i = 0; i < na; i++)
            if (x[i].i != y[i].i || x[i].r != y[i].r || (x[i].type == MOE_ATTR_TEXT && strcmp(x[i].text, y[i].text)))
                fail_msg("%s: %s differs after export and import", moe_hf_type_str(t), x[i].name);
    }
    /* what a type cannot express is refused naming the option */
    moe_train_config c;
    moe_hf_type t;
    assert_int_equal(parse(&c, &t, MOE_HF_QWEN3_MOE, "", 64), MOE_OK);
    assert_int_equal(moe_hf_type_check(MOE_HF_MIXTRAL, &c, NULL), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "qk_norm"));
    moe_train_config_default(&c);
    assert_int_equal(moe_hf_type_for(&t, &c), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "norm = layernorm"));
    int warn = 0;
    assert_int_equal(parse(&c, &t, MOE_HF_MIXTRAL, "", 64), MOE_OK);
    c.capacity_factor = 1.25;
    assert_int_equal(moe_hf_type_check(MOE_HF_MIXTRAL, &c, &warn), MOE_OK);
    assert_int_equal(warn, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_types),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_not_a_model),
        cmocka_unit_test(test_write_parse_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
