"""`fp4kv_jax.key_rounding`: keys rounded against the queries' second moment, in the
format's own bytes, and the cache and memory figures that hold them."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import cache as C
from fp4kv_jax import key_rounding
from fp4kv_jax.cache_io import load_cache, save_cache
from fp4kv_jax.formats import get_codec, quantize
from fp4kv_jax.memory import kv_cache_bytes
from fp4kv_jax.models import from_pretrained
from fp4kv_jax.models.configs import ModelConfig
from fp4kv_jax.models.layers import rope_inverse_frequencies
from fp4kv_jax.recipes import recipe_from_name
from fp4kv_jax.rotation import hadamard_matrix, hadamard_rotate

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = ModelConfig(
    architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=32,
)
PACKED_FP4 = ("fp4_e2m1", "mxfp4", "nvfp4", "nvfp4_search")


def _anisotropic_moments(head_dim: int, seed: int = 0) -> np.ndarray:
    """Queries concentrated in a few directions, as real ones are."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(head_dim, head_dim)) * np.exp(rng.normal(size=head_dim))[:, None]
    return (mixing @ mixing.T / head_dim).astype(np.float32)


def _keys(shape, seed=1) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2.0, jnp.float32)


@pytest.mark.parametrize("fmt", PACKED_FP4)
def test_isotropic_queries_give_the_formats_own_bytes(fmt):
    x = _keys((2, 5, 2, 32))
    global_scale = get_codec(fmt).global_scale_for(x)
    factor = key_rounding.rounding_factor(key_rounding.isotropic_moments(TINY)[0], rotated=False)
    data, scales = key_rounding.round_keys(x, fmt, global_scale, factor)
    nearest = quantize(x, fmt, global_scale=global_scale)
    np.testing.assert_array_equal(data, nearest.data)
    np.testing.assert_array_equal(np.asarray(scales, np.float32), np.asarray(nearest.scales, np.float32))


@pytest.mark.parametrize("fmt", PACKED_FP4)
@pytest.mark.parametrize("rotated", [False, True])
def test_rounding_keeps_the_scales_and_cuts_the_query_weighted_error(fmt, rotated):
    sigma = _anisotropic_moments(32)
    x = _keys((1, 200, 1, 32))
    global_scale = get_codec(fmt).global_scale_for(x)
    data, scales = key_rounding.round_keys(
        x, fmt, global_scale, key_rounding.rounding_factor(sigma[None], rotated=rotated)
    )
    nearest = quantize(x, fmt, global_scale=global_scale)
    np.testing.assert_array_equal(np.asarray(scales, np.float32), np.asarray(nearest.scales, np.float32))
    # The factor is built for the stored (rotated) frame: score the error there.
    frame = hadamard_matrix(32) if rotated else np.eye(32)
    sigma_stored = frame.T @ sigma @ frame

    def weighted_error(stored_data):
        error = np.asarray(get_codec(fmt).decode(stored_data, nearest.scales, global_scale) - x)[0, :, 0]
        return np.einsum("td,de,te->", error, sigma_stored, error)

    assert weighted_error(data) < 0.85 * weighted_error(nearest.data)


def test_a_nonfinite_key_spoils_only_its_own_block():
    x = np.array(_keys((1, 3, 1, 32)))
    x[0, 1, 0, 3] = np.nan
    factor = key_rounding.rounding_factor(_anisotropic_moments(32)[None], rotated=False)
    data, scales = key_rounding.round_keys(jnp.asarray(x), "nvfp4", jnp.float32(0.01), factor)
    read = np.asarray(get_codec("nvfp4").decode(data, scales, jnp.float32(0.01)))
    assert np.isnan(read[0, 1, 0, :16]).all()
    assert np.isfinite(read[0, 1, 0, 16:]).all() and np.isfinite(read[0, [0, 2]]).all()


def test_query_moments_are_the_mean_outer_product_of_each_kv_heads_queries():
    model = from_pretrained(FIXTURES / "llama", dtype=jnp.float32)
    config = model.config
    windows = np.arange(2 * 6).reshape(2, 6) % config.vocab_size
    moments = key_rounding.query_moments(model, windows)
    assert moments.shape == (config.num_layers, config.num_kv_heads, config.head_dim, config.head_dim)
    # Layer 0 reads the embeddings: its queries are easy to form here.
    block = model.layers[0]
    group = config.num_heads // config.num_kv_heads
    expected = 0
    for window in windows:
        x = model.embed_tokens[...][window[None]]
        q, _, _ = block.self_attn.project(block.input_layernorm(x), jnp.arange(6)[None], rope_inverse_frequencies(config))
        q = np.asarray(q[0]).reshape(6, config.num_kv_heads, group, config.head_dim)
        expected = expected + np.einsum("tkgd,tkge->kde", q, q) / (6 * group) / len(windows)
    np.testing.assert_allclose(moments[0], expected, rtol=1e-4, atol=1e-6)


def test_a_rounding_cache_stores_the_rounded_keys_and_counts_its_factors():
    moments = np.stack([np.stack([_anisotropic_moments(32, seed)] * 2) for seed in range(2)])
    cache = C.init_cache(TINY, 2, 8, "nvfp4_search", rotate_keys=True, query_moments=moments)
    assert cache.nbytes == kv_cache_bytes(TINY, "nvfp4_search", 2, 8, round_keys=True)
    assert kv_cache_bytes(TINY, "nvfp4_search", 2, 8, round_keys=True) - kv_cache_bytes(
        TINY, "nvfp4_search", 2, 8
    ) == TINY.num_layers * 2 * 32 * 32 * 4
    k, v = _keys((2, 5, 2, 32), 3), _keys((2, 5, 2, 32), 4)
    written = C.update(cache, [k, k], [v, v])
    layer = written.layers[0]
    data, _ = key_rounding.round_keys(hadamard_rotate(k), "nvfp4_search", layer.k.global_scale, layer.key_rounding)
    np.testing.assert_array_equal(layer.k.data[:, :, :5], data.swapaxes(1, 2))
    plain = C.update(C.init_cache(TINY, 2, 8, "nvfp4_search", rotate_keys=True), [k, k], [v, v])
    assert not np.array_equal(layer.k.data, plain.layers[0].k.data)
    np.testing.assert_array_equal(layer.v.data, plain.layers[0].v.data)


def test_a_rounding_cache_saves_and_loads_its_factors(tmp_path):
    moments = np.stack([np.stack([_anisotropic_moments(32)] * 2)] * 2)
    cache = C.init_cache(TINY, 1, 4, "nvfp4", query_moments=moments)
    loaded = load_cache(save_cache(tmp_path / "cache", cache))
    np.testing.assert_array_equal(loaded.layers[1].key_rounding, cache.layers[1].key_rounding)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query_moments=np.zeros((2, 2, 32, 16))), r"query_moments: expected finite float \[layers"),
        (dict(query_moments=np.full((2, 2, 32, 32), np.nan)), "with non-finite entries"),
        (dict(cache_dtype="fp8_e4m3"), "needs packed FP4 keys"),
        (dict(per_channel_keys=True, keep_recent=16), "not combined with per_channel_keys"),
    ],
)
def test_bad_query_moments_are_refused_by_name(kwargs, match):
    arguments = dict(cache_dtype="nvfp4", query_moments=key_rounding.isotropic_moments(TINY)) | kwargs
    with pytest.raises(ValueError, match=match):
        C.init_cache(TINY, 1, 4, arguments.pop("cache_dtype"), **arguments)


def test_a_rounding_recipe_needs_calibrated_moments():
    recipe = recipe_from_name("nvfp4+round_keys")
    assert recipe.rounds_keys and recipe.storage["round_keys"]
    with pytest.raises(ValueError, match="query_moments: recipe 'nvfp4\\+round_keys' rounds keys"):
        recipe.cache_options()
    assert "query_moments" in recipe.cache_options(key_rounding.isotropic_moments(TINY))
