import os

# Tests run on the CPU; multi-device tests start their own subprocess with the XLA flag set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from tests.helpers import TEST_XLA_FLAGS  # noqa: E402  (no JAX import)
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()


# The default suite (`make test`, -m "not slow") stays under 15 minutes on the 2-core CI
# machine: these tests took 14 s to 10 min each there (pytest --durations, 2026-12-02) and
# each has a cheaper default sibling that checks the same code (another parameter of the
# same test, or a smaller test of the same function). They run under `make test-slow`.
SLOW_BY_DURATION = {
    "tests/test_ops_attention.py::test_pallas_flash_kernels_interpret[tpu-kw1]",
    "tests/test_structured_ffn.py::test_merge_ffn_is_exact_and_dense",
    "tests/test_linearize.py::test_linearized_checkpoint_round_trip",
    "tests/test_objectives.py::test_calibrate_fits_the_supra_norm_affine_to_the_teacher",
    "tests/test_convert.py::test_linjax_checkpoint_roundtrip_any_mixer",
    "tests/test_ops_delta.py::test_varlen_tail_traced[assoc_scan-head]",
    "tests/test_mixers.py::test_left_padding_and_segments[gated_deltanet-]",
    "tests/test_mixers.py::test_left_padding_and_segments[gla-]",
    "tests/test_ops_delta.py::test_step_matches_full_op[head]",
    "tests/test_ops_delta.py::test_split_and_resume[chunk-head]",
    "tests/test_ops_delta.py::test_matrix[assoc_scan-63-60-16-head-weak]",
    "tests/test_ops_delta.py::test_long_bf16_strong_gates",
    "tests/test_ops_misc.py::test_feature_maps_feed_normalized_linear_attention",
    "tests/test_mixers.py::test_chunked_prefill_then_decode_equals_token_by_token[sliding_window]",
    "tests/test_mixers.py::test_chunked_prefill_then_decode_equals_token_by_token[lolcats-window=8-variant=sw]",
    "tests/test_objectives.py::test_attention_mse_by_hand[gla-kw1]",
    "tests/test_recurrent_transformer.py::test_gradients_finite_and_reach_the_first_window_over_long_sequences[convex-0.9]",
    "tests/test_ops_attention.py::test_merge_over_disjoint_key_sets_equals_one_pass",
    "tests/test_mixers.py::test_left_padding_and_segments[lolcats-window=8-variant=sw]",
    "tests/test_mixers.py::test_left_padding_and_segments[lolcats-window=8-variant=tk]",
    "tests/test_ops_delta.py::test_varlen_with_empty_sequence[recurrent]",
    "tests/test_ops_delta.py::test_methods_match_reference[recurrent-None]",
    "tests/test_mixers.py::test_every_parameter_leaf_gradient_matches_finite_differences[gated_deltanet--chunk]",
    "tests/test_mixers.py::test_every_parameter_leaf_gradient_matches_finite_differences[deltanet-allow_neg_eigval=True-chunk]",
    "tests/test_structured_ffn.py::test_block_shuffle_matches_index_loops_and_projection_is_exact[24-40-4]",
    "tests/test_ops_delta.py::test_matrix[chunk-1-60-16-head-weak]",
    "tests/test_ops_gla.py::test_bf16_inputs[chunk-channel]",
    "tests/test_recurrent_transformer.py::test_copy_task_is_learned_through_the_state",
    "tests/test_experiments.py::test_experiment_builds_and_validates[ffn_compress_smollm2.py:cpu_r4]",
    "tests/test_hf_export.py::test_generate_matches_linjax[lolcats-window=8-variant=tk]",
    "tests/test_hf_export.py::test_hybrid_layers_and_transformers_resave",
    "tests/test_hf_export.py::test_native_checkpoint_names_its_architecture",
    "tests/test_linearize.py::test_attention_transfer_stage_decreases_its_loss[linear-kw1-attention_xent]",
    "tests/test_linearize.py::test_attention_transfer_stage_decreases_its_loss[lolcats-kw0-attention_mse]",
    "tests/test_linearize.py::test_lolcats_with_a_window_covering_everything_is_the_teacher",
    "tests/test_linearize.py::test_recipe_configs_run_on_a_tiny_model[lolcats-linjax_15m]",
    "tests/test_linearize.py::test_recipe_configs_run_on_a_tiny_model[lolcats-paper_15m]",
    "tests/test_llama.py::test_full_cache_overflow_raises_instead_of_dropping_tokens",
    "tests/test_llama.py::test_kv_cache_decode_equals_full_forward[mha_tied_linear]",
    "tests/test_llama.py::test_left_padded_cache_rows_ignore_padding",
    "tests/test_llama.py::test_packed_segments_and_positions_match_separate_documents",
    "tests/test_llama.py::test_return_hidden_and_remat",
    "tests/test_llama.py::test_scan_layers_equals_the_loop[mixers1]",
    "tests/test_llama.py::test_scan_layers_equals_the_loop[mixers2]",
    "tests/test_llama.py::test_scan_layers_over_different_layers_runs_the_loop",
    "tests/test_llama.py::test_sliding_window_ring_cache_equals_full_forward",
    "tests/test_llama.py::test_tied_model_has_no_lm_head_and_bf16_runs",
    "tests/test_lm_eval_adapter.py::test_plain_lm_eval_cli_with_the_pth_plugin",
    "tests/test_lora.py::test_apply_merge_equals_unmerged_and_restores_structure",
    "tests/test_lora.py::test_dropout_only_in_training_mode",
    "tests/test_lora.py::test_save_and_load_adapters_alone",
    "tests/test_mixers.py::test_chunked_prefill_then_decode_equals_token_by_token[liger-window=8]",
    "tests/test_mixers.py::test_left_padding_and_segments[liger-window=8]",
    "tests/test_mixers.py::test_left_padding_and_segments[linear-feature_map=hedgehog]",
    "tests/test_mixers.py::test_llama_with_mixers_decodes_like_full_pass[deltanet-kw1]",
    "tests/test_mixers.py::test_llama_with_mixers_decodes_like_full_pass[lolcats-kw0]",
    "tests/test_mixers.py::test_pallas_method_matches_chunk_in_a_llama[gated_deltanet-]",
    "tests/test_mixers.py::test_pallas_method_matches_chunk_in_a_llama[gla-]",
    "tests/test_mixers.py::test_pallas_method_matches_chunk_in_a_llama[liger-window=8]",
    "tests/test_mixers.py::test_pallas_method_matches_chunk_in_a_llama[linear-feature_map=hedgehog]",
    "tests/test_multiprocess.py::test_two_processes_equal_one_process",
    "tests/test_notebooks.py::test_notebook_runs[01_ops_and_kernels.ipynb]",
    "tests/test_notebooks.py::test_notebook_runs[02_linearize_llama.ipynb]",
    "tests/test_notebooks.py::test_notebook_runs[03_sequence_parallel.ipynb]",
    "tests/test_ops_attention.py::test_pallas_flash_kernels_interpret[gpu-kw0]",
    "tests/test_ops_delta.py::test_auto_and_pallas_dispatch",
    "tests/test_ops_delta.py::test_bf16_inputs[chunk-head]",
    "tests/test_ops_delta.py::test_fla_naive_delta_rule_and_gated",
    "tests/test_ops_delta.py::test_matrix[chunk-500-128-64-head-mixed]",
    "tests/test_ops_delta.py::test_matrix[chunk-63-128-64-head-strong]",
    "tests/test_ops_delta.py::test_matrix[parallel-500-60-64-head-weak]",
    "tests/test_ops_delta.py::test_segment_ids_reset_per_document[head-chunk]",
    "tests/test_ops_delta.py::test_step_matches_full_op[None]",
    "tests/test_ops_delta.py::test_varlen_tail_traced[chunk-head]",
    "tests/test_ops_delta.py::test_varlen_tail_traced[pallas-head]",
    "tests/test_ops_delta.py::test_varlen_tail_traced[recurrent-None]",
    "tests/test_ops_gla.py::test_varlen_tail_traced[pallas-channel]",
    "tests/test_ops_misc.py::test_attention_decode_positions",
    "tests/test_ops_misc.py::test_inv_unit_lower_matches_numpy_inverse[37]",
    "tests/test_pallas.py::test_bf16_accuracy_small[delta-weak]",
    "tests/test_pallas.py::test_bf16_accuracy_small[gla-strong]",
    "tests/test_pallas.py::test_bf16_accuracy_small[simple_gla-strong]",
    "tests/test_pallas.py::test_delta_fp32_odd_length_headdim60[True]",
    "tests/test_pallas.py::test_forms_agree_in_bf16",
    "tests/test_pallas.py::test_forward_forms[delta-scalar-tpu-two_pass]",
    "tests/test_pallas.py::test_forward_forms[gla-channel-gpu-fused]",
    "tests/test_pallas.py::test_gla_bf16_headdim128",
    "tests/test_pallas.py::test_gla_fp32_odd_length_headdim60[channel]",
    "tests/test_pallas.py::test_gla_split_and_resume",
    "tests/test_pallas.py::test_gla_strong_gates[channel]",
    "tests/test_pallas.py::test_gpu_k_and_v_tiles",
    "tests/test_pallas.py::test_public_entry_points_default_interpret_and_no_state",
    "tests/test_pallas.py::test_segment_ids[delta-scalar-tpu]",
    "tests/test_pallas.py::test_segment_ids[gla-channel-gpu]",
    "tests/test_pallas.py::test_tpu_several_chunks_per_step",
    "tests/test_pallas.py::test_tpu_varlen_several_chunks_per_step",
    "tests/test_pallas_gpu.py::test_gpu_run_dry_run",
    "tests/test_parallel.py::test_mesh_rules_and_sharded_creation",
    "tests/test_recurrent_transformer.py::test_full_form_equals_token_by_token_decoding[convex]",
    "tests/test_recurrent_transformer.py::test_gradients_finite_and_reach_the_first_window_over_long_sequences[add-0.5]",
    "tests/test_sequence_parallel.py::test_lasp2_runs_the_pallas_kernels",
    "tests/test_sequence_parallel.py::test_lasp2_varlen_across_shards",
    "tests/test_sequence_parallel.py::test_lasp2h_attention_and_hlo",
    "tests/test_sequence_parallel.py::test_llama_train_step_data_seq_fsdp",
    "tests/test_structured_ffn.py::test_compress_some_layers_and_scan_layers",
    "tests/test_structured_ffn.py::test_hf_export_refuses_structured_and_exports_merged",
    "tests/test_structured_ffn.py::test_lora_on_lowrank_factors_and_refusal_on_blocks",
    "tests/test_structured_ffn.py::test_param_counts_match_the_modules",
    "tests/test_structured_ffn.py::test_save_load_round_trip",
    "tests/test_structured_ffn.py::test_svd_init_of_hf_llama_reproduces_torch_logits_at_full_rank[gqa_llama3_bias]",
    "tests/test_train.py::test_budgets_in_tokens_and_time",
    "tests/test_train.py::test_eight_fake_devices_match_one_device",
    "tests/test_train.py::test_frozen_parameters_stay_frozen",
    "tests/test_train.py::test_resume_with_a_changed_config_is_refused_naming_the_fields",
    "tests/test_train.py::test_sigkill_in_a_stage_and_resume_gives_identical_parameters[finetune:2]",
    "tests/test_mixers.py::test_prefill_then_decode[lolcats-window=8-variant=sw]",
    "tests/test_mixers.py::test_prefill_then_decode[lolcats-window=8-variant=tk]",
    "tests/test_mixers.py::test_prefill_then_decode[liger-window=8]",
    "tests/test_mixers.py::test_prefill_then_decode[gated_deltanet-]",
    "tests/test_mixers.py::test_every_parameter_leaf_gradient_matches_finite_differences[lolcats-sw-parallel]",
    "tests/test_mixers.py::test_every_parameter_leaf_gradient_matches_finite_differences[lolcats-tk-parallel]",
    "tests/test_hf_export.py::test_logits_match_linjax[deltanet-]",
    "tests/test_hf_export.py::test_logits_match_linjax[lolcats-window=8-variant=sw]",
    "tests/test_hf_export.py::test_logits_match_linjax[liger-window=8]",
    "tests/test_hf_export.py::test_logits_match_linjax[gated_deltanet-]",
    "tests/test_mixers.py::test_chunked_prefill_then_decode_equals_token_by_token[softmax]",
    "tests/test_mixers.py::test_chunked_prefill_then_decode_equals_token_by_token[deltanet-allow_neg_eigval=True]",
    "tests/test_mixers.py::test_methods_agree[deltanet-allow_neg_eigval=True]",
    "tests/test_objectives.py::test_attention_mse_by_hand[liger-kw2]",
}


import pytest as _pytest


# Parametrized tests whose default run keeps one case per mixer family (the rest are slow).
DEFAULT_CASES = {
    "tests/test_hf_export.py::test_decode_equals_full_pass_in_torch": {
        "linear-feature_map=hedgehog", "gla-", "gated_deltanet-allow_neg_eigval=True", "supra-",
        "lolcats-window=8-variant=sw", "lolcats-window=8-variant=tk", "liger-window=8",
        "sliding_window-window=8-num_sinks=2"},
}


@_pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  for item in items:
    base, _, case = item.nodeid.partition("[")
    keep = DEFAULT_CASES.get(base)
    if item.nodeid in SLOW_BY_DURATION or (keep is not None and case[:-1] not in keep):
      item.add_marker(_pytest.mark.slow)
