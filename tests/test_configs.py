"""Model configs: built-in ids, HF config.json parsing, and clear refusals."""

import json

import pytest

from fp4kv_jax.models.configs import SLIDING_ATTENTION, config_from_hf, get_config


def test_builtin_ids_are_case_insensitive_and_complete():
    for name in ("qwen3-235b-a22b", "qwen3-8b", "gpt-oss-20b", "gpt-oss-120b", "smollm2-135m"):
        assert get_config(name.upper()) is get_config(name)
    smol = get_config("smollm2-135m")
    assert (smol.num_layers, smol.num_heads, smol.num_kv_heads, smol.head_dim) == (30, 9, 3, 64)


def test_gpt_oss_alternates_sliding_and_full_layers():
    cfg = get_config("gpt-oss-120b")
    assert cfg.layer_types[0] == SLIDING_ATTENTION and cfg.layer_window(0) == 128
    assert cfg.layer_window(1) is None and cfg.num_layers == 36


def test_hf_directory_with_either_rope_style(tmp_path):
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    old = base | dict(rope_theta=5e5, rope_scaling=dict(type="linear", factor=2.0))
    new = base | dict(rope_parameters=dict(rope_type="linear", rope_theta=5e5, factor=2.0))
    for i, cfg in enumerate((old, new)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(cfg))
        parsed = get_config(tmp_path / str(i))
        assert parsed.rope_theta == 5e5 and parsed.rope_scaling == dict(rope_type="linear", factor=2.0)
        assert parsed.qk_norm and parsed.head_dim == 16


def test_unknown_model_type_and_missing_keys_are_named():
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        config_from_hf(dict(model_type="mamba"))
    with pytest.raises(ValueError, match="missing key 'hidden_size'"):
        config_from_hf(dict(model_type="llama", vocab_size=3))
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        config_from_hf(dict(model_type="llama", vocab_size=3, hidden_size=8, num_hidden_layers=1,
                            num_attention_heads=2, rope_scaling=dict(rope_type="longrope")))
