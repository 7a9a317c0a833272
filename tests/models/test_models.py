"""Models against HF transformers' golden logits, and prefix-then-decode consistency.

The fixtures in tests/fixtures/ come from scripts/make_golden_fixtures.py (HF
transformers, tiny random checkpoints); these tests need no torch.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax.models import from_pretrained
from fp4kv_jax.models.transformer import forward_with_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ARCHITECTURES = ["llama", "qwen2", "qwen3", "gpt_oss"]


def _golden(name):
    with np.load(FIXTURES / name / "golden.npz") as data:
        return data["input_ids"], data["logits"]


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def fixture_model(request):
    return request.param, from_pretrained(FIXTURES / request.param, dtype=jnp.float32)


def test_full_forward_matches_hf_logits(fixture_model):
    name, model = fixture_model
    input_ids, logits = _golden(name)
    assert _relative_error(model(input_ids), logits) < 1e-4


@pytest.mark.parametrize("cache_dtype, tolerance", [("float32", 1e-5), ("bf16", 2e-2)])
def test_prefix_then_token_by_token_decode_reproduces_full_forward(fixture_model, cache_dtype, tolerance):
    name, model = fixture_model
    input_ids, _ = _golden(name)
    full = np.asarray(model(input_ids))
    prefix = 5
    cache = model.init_cache(input_ids.shape[0], input_ids.shape[1], cache_dtype)
    logits, cache = forward_with_cache(model, input_ids[:, :prefix], cache)
    steps = [logits]
    for t in range(prefix, input_ids.shape[1]):
        logits, cache = forward_with_cache(model, input_ids[:, t : t + 1], cache)
        steps.append(logits)
    incremental = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert _relative_error(incremental, full) < tolerance
    np.testing.assert_array_equal(cache.lengths, input_ids.shape[1])


def test_gpt_oss_fixture_exercises_windows_sinks_and_experts():
    model = from_pretrained(FIXTURES / "gpt_oss", dtype=jnp.float32)
    config = model.config
    input_ids, _ = _golden("gpt_oss")
    assert input_ids.shape[1] > config.sliding_window
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.num_experts > 1 and config.experts_per_token > 1
    assert all(np.abs(np.asarray(layer.self_attn.sinks[...])).max() > 0 for layer in model.layers)


def test_mxfp4_packed_experts_give_the_same_logits_as_their_dequantized_twin():
    packed = from_pretrained(FIXTURES / "gpt_oss_mxfp4", dtype=jnp.float32)
    plain = from_pretrained(FIXTURES / "gpt_oss", dtype=jnp.float32)
    input_ids, logits = _golden("gpt_oss")
    np.testing.assert_array_equal(np.asarray(packed(input_ids)), np.asarray(plain(input_ids)))
    assert _relative_error(packed(input_ids), logits) < 1e-4


def test_loader_names_missing_misshapen_and_unknown_tensors(tmp_path):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    source = FIXTURES / "qwen2"
    tensors = load_file(source / "model.safetensors")

    def write(name, changed):
        target = tmp_path / name
        target.mkdir()
        shutil.copy(source / "config.json", target / "config.json")
        save_file(changed, target / "model.safetensors")
        return target

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\]"):
        from_pretrained(write("missing", missing))
    misshapen = dict(tensors) | {"model.norm.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        from_pretrained(write("misshapen", misshapen))
    extra = dict(tensors) | {"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight.*match no parameter"):
        from_pretrained(write("extra", extra))
    target = write("unknown", tensors)
    config = json.loads((target / "config.json").read_text()) | {"model_type": "mamba"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        from_pretrained(target)


def test_orbax_round_trip_reproduces_the_model_exactly(tmp_path):
    from fp4kv_jax.models.loading import save_pretrained

    model = from_pretrained(FIXTURES / "qwen3", dtype=jnp.float32)
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "qwen3"), dtype=jnp.float32)
    input_ids, _ = _golden("qwen3")
    np.testing.assert_array_equal(np.asarray(reloaded(input_ids)), np.asarray(model(input_ids)))
    assert reloaded.config == model.config
    with pytest.raises(FileExistsError, match="directory"):
        save_pretrained(model, tmp_path / "qwen3")


def test_hf_directory_with_tokenizer_json_loads_it(tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    target = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", target)
    tokenizer = Tokenizer(models.WordLevel({"hello": 3, "world": 4, "[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(target / "tokenizer.json"))
    model = from_pretrained(target, dtype=jnp.float32)
    assert model.tokenizer.encode("hello world").ids == [3, 4]
    assert from_pretrained(FIXTURES / "llama", dtype=jnp.float32).tokenizer is None
