"""Keys quantized per channel over blocks of positions: the codec transform, and the
cache that stages a block in its recent window until the block fills."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import cache as C
from fp4kv_jax import channel_keys, dequantize, quantize
from fp4kv_jax.ablate import score_window
from fp4kv_jax.formats import QuantizedTensor
from fp4kv_jax.models import from_pretrained
from fp4kv_jax.models.transformer import forward_with_cache
from fp4kv_jax.recipes import recipe_from_name

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _per_channel(x, fmt, global_scale=None):
    """x [..., S, D] stored per channel, as a QuantizedTensor of x's shape."""
    block = channel_keys.check_format(fmt, arg="fmt")
    *lead, positions, head_dim = x.shape
    data, scales = channel_keys.encode_blocks(x.reshape(*lead, positions // block, block, head_dim), fmt, global_scale)
    return QuantizedTensor(
        data.reshape(*lead, positions, head_dim // 2), scales.reshape(*lead, positions, -1), global_scale, fmt
    )


def test_values_on_each_channels_grid_round_trip_exactly():
    key = jax.random.split(jax.random.key(0), 3)
    magnitudes = jnp.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = jax.random.randint(key[0], (2, 32, 64), 0, 8)
    signs = jnp.where(jax.random.bernoulli(key[1], shape=codes.shape), -1.0, 1.0)
    exponents = jax.random.randint(key[2], (2, 2, 1, 64), -6, 7)  # one per channel per block of 16
    x = (signs * magnitudes[codes]).reshape(2, 2, 16, 64).at[:, :, 0].set(6.0) * 2.0**exponents
    x = x.reshape(2, 32, 64)
    np.testing.assert_array_equal(np.asarray(channel_keys.decode(_per_channel(x, "fp4_e2m1"))), np.asarray(x))


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "mxfp4", "nvfp4"])
def test_an_outlier_channel_costs_only_itself(fmt):
    x = jax.random.normal(jax.random.key(1), (4, 64, 128)).at[..., 7].multiply(50.0)
    global_scale = quantize(x, fmt).global_scale
    per_channel = channel_keys.decode(_per_channel(x, fmt, global_scale))
    per_token = dequantize(quantize(x, fmt, global_scale=global_scale))
    others = np.arange(128) != 7
    error = lambda y: float(jnp.linalg.norm((y - x)[..., others]) / jnp.linalg.norm(x[..., others]))
    assert error(per_channel) < 0.6 * error(per_token)


@pytest.fixture(scope="module")
def llama():
    return from_pretrained(FIXTURES / "llama", dtype=jnp.float32)


def test_positions_inside_the_window_are_read_in_bf16_and_older_ones_per_channel(llama):
    # One-pass scoring equals decode through such a cache: tests/test_ablate.py.
    with np.load(FIXTURES / "llama" / "golden.npz") as golden:
        input_ids = golden["input_ids"][:1, :30]
    scored = np.asarray(score_window(llama, input_ids, recipe_from_name("nvfp4+channel_keys+recent=16+hadamard")).nll[0])
    bf16 = np.asarray(score_window(llama, input_ids, recipe_from_name("bf16+hadamard")).nll[0])
    np.testing.assert_allclose(scored[:16], bf16[:16], atol=1e-6)
    assert np.abs(scored - bf16)[16:].max() > 1e-3
    cache = recipe_from_name("nvfp4+channel_keys+recent=16").build_cache(llama, 1, 30)
    _, cache = forward_with_cache(llama, input_ids, cache)
    keys, _, _ = C.read_layer(cache, 0)
    assert bool(jnp.all(jnp.isfinite(keys)))


def test_keys_per_channel_need_a_packed_format_and_a_window_that_stages_a_block():
    with pytest.raises(ValueError, match="per_channel_keys: keys per channel need a packed FP4 format"):
        C.init_cache("smollm2-135m", 1, 32, "fp8_e4m3", per_channel_keys=True, keep_recent=16)
    with pytest.raises(ValueError, match="per_channel_keys: needs keep_recent >= 16"):
        C.init_cache("smollm2-135m", 1, 32, "nvfp4", per_channel_keys=True, keep_recent=8)
    with pytest.raises(ValueError, match="per_channel_keys: needs keep_recent >= 32"):
        C.init_cache("smollm2-135m", 1, 48, "mxfp4", per_channel_keys=True, keep_recent=16)
