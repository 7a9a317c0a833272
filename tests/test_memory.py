"""Memory planning counts block scales and trimmed windows, to the byte."""

import pytest

from fp4kv_jax import cache as C
from fp4kv_jax import format_names
from fp4kv_jax.memory import fixed_bytes_per_sequence, kv_cache_bytes, kv_cache_bytes_per_token, max_cache_tokens


@pytest.mark.parametrize(
    "fmt, expected", [("bf16", 192_512), ("fp8_e4m3", 96_256), ("fp4_e2m1", 54_144), ("nvfp4", 54_144)]
)
def test_qwen3_235b_bytes_per_token_match_spec(fmt, expected):
    assert kv_cache_bytes_per_token("qwen3-235b-a22b", fmt) == expected


def test_fp4_matches_sglang_planning_formula():
    layers, heads, dim = 94, 4, 128
    sglang = heads * dim * layers // 2 * 2 + heads * dim * layers * 2 // 16
    assert kv_cache_bytes_per_token("qwen3-235b-a22b", "fp4_e2m1") == sglang


@pytest.mark.parametrize("fmt", format_names())
@pytest.mark.parametrize("trim", [False, True])
def test_estimate_equals_allocated_bytes(fmt, trim):
    args = ("gpt-oss-20b", 2, 300)
    allocated = C.init_cache(*args, cache_dtype=fmt, trim_sliding_layers=trim).nbytes
    assert kv_cache_bytes(args[0], fmt, *args[1:], trim_sliding_layers=trim) == allocated


def test_key_and_value_dtypes_are_counted_apart_and_equal_allocated_bytes():
    per_token = kv_cache_bytes_per_token("gpt-oss-20b", "nvfp4", value_dtype="bf16")
    halves = kv_cache_bytes_per_token("gpt-oss-20b", "nvfp4") + kv_cache_bytes_per_token("gpt-oss-20b", "bf16")
    assert per_token == halves // 2
    allocated = C.init_cache("gpt-oss-20b", 2, 300, "bf16", key_dtype="nvfp4").nbytes
    assert kv_cache_bytes("gpt-oss-20b", "bf16", 2, 300, key_dtype="nvfp4") == allocated


def test_bf16_layers_are_counted_as_bf16_and_equal_allocated_bytes():
    mixed = ["bf16"] * 2 + ["nvfp4"] * 28
    assert kv_cache_bytes_per_token("smollm2-135m", "nvfp4", bf16_layers=(0, 1)) == kv_cache_bytes_per_token(
        "smollm2-135m", mixed
    )
    allocated = C.init_cache("gpt-oss-20b", 2, 300, "nvfp4", value_dtype="fp8_e4m3", bf16_layers=(3,)).nbytes
    assert kv_cache_bytes("gpt-oss-20b", "nvfp4", 2, 300, value_dtype="fp8_e4m3", bf16_layers=(3,)) == allocated


def test_per_layer_dtypes_are_summed():
    mixed = ["bf16"] * 15 + ["fp4_e2m1"] * 15
    expected = (kv_cache_bytes_per_token("smollm2-135m", "bf16") + kv_cache_bytes_per_token("smollm2-135m", "fp4_e2m1")) // 2
    assert kv_cache_bytes_per_token("smollm2-135m", mixed) == expected


def test_max_cache_tokens_is_the_largest_length_that_fits():
    budget = 10 * 2**20
    for fmt in ("bf16", "fp4_e2m1"):
        n = max_cache_tokens("smollm2-135m", fmt, budget, batch_size=2)
        assert kv_cache_bytes("smollm2-135m", fmt, 2, n) <= budget
        assert kv_cache_bytes("smollm2-135m", fmt, 2, n + 1) > budget
    assert max_cache_tokens("smollm2-135m", "bf16", 100) == 0


def test_trimmed_sliding_layers_fit_more_tokens():
    budget = 2**30
    plain = max_cache_tokens("gpt-oss-20b", "fp4_e2m1", budget)
    trimmed = max_cache_tokens("gpt-oss-20b", "fp4_e2m1", budget, trim_sliding_layers=True)
    assert trimmed > 1.9 * plain


def test_kept_positions_cost_a_fixed_amount_per_sequence_equal_to_allocated_bytes():
    kept = dict(keep_first=4, keep_recent=28)
    cache = C.init_cache("smollm2-135m", 3, 100, "nvfp4", **kept)
    assert kv_cache_bytes("smollm2-135m", "nvfp4", 3, 100, **kept) == cache.nbytes
    extra = kv_cache_bytes("smollm2-135m", "nvfp4", 3, 100, **kept) - kv_cache_bytes("smollm2-135m", "nvfp4", 3, 100)
    assert extra == 3 * fixed_bytes_per_sequence("smollm2-135m", **kept) == 3 * 2 * 30 * 3 * 32 * 64 * 2
    assert kv_cache_bytes_per_token("smollm2-135m", "nvfp4", **kept) == kv_cache_bytes_per_token("smollm2-135m", "nvfp4")
    # fp8 copies: one byte an element, half the bf16 copies' cost.
    in_fp8 = dict(kept, kept_dtype="fp8_e4m3")
    assert kv_cache_bytes("smollm2-135m", "nvfp4", 3, 100, **in_fp8) == C.init_cache("smollm2-135m", 3, 100, "nvfp4", **in_fp8).nbytes
    assert 2 * fixed_bytes_per_sequence("smollm2-135m", **in_fp8) == fixed_bytes_per_sequence("smollm2-135m", **kept)


def test_a_centered_cache_costs_its_means_per_sequence_equal_to_allocated_bytes():
    centered = dict(center_keys=True, center_values=True)
    cache = C.init_cache("smollm2-135m", 2, 50, "nvfp4", **centered)
    assert kv_cache_bytes("smollm2-135m", "nvfp4", 2, 50, **centered) == cache.nbytes
    assert fixed_bytes_per_sequence("smollm2-135m", **centered) == 2 * 30 * 3 * 64 * 4
