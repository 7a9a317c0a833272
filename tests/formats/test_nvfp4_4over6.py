"""nvfp4_4over6: nvfp4 bytes whose block scales come from Four Over Six's choice."""

import jax
import jax.numpy as jnp
import numpy as np

import fp4kv_jax as fk
from fp4kv_jax.formats import get_codec


def _block_max_errors(x, q):
    err = jnp.abs(fk.dequantize(q) - x).reshape(*x.shape[:-1], -1, 16)
    return np.asarray(jnp.max(err, axis=-1))


def test_a_block_near_five_takes_the_scale_of_four():
    x = jnp.full((1, 16), 5.0, jnp.float32)
    g = jnp.float32(1.0)
    six, chosen = fk.quantize(x, "nvfp4", global_scale=g), fk.quantize(x, "nvfp4_4over6", global_scale=g)
    # Six: scale e4m3(5 / 6) = 0.8125 and codes of 6, so 4.875; four: scale 1.25 and 4.
    np.testing.assert_array_equal(fk.dequantize(six), np.full((1, 16), 4.875))
    np.testing.assert_array_equal(fk.dequantize(chosen), x)
    assert float(chosen.scales.astype(jnp.float32)[0, 0]) == 1.25


def test_each_block_keeps_the_encoding_with_the_smaller_largest_error():
    x = jax.random.normal(jax.random.key(0), (32, 128)) * jnp.linspace(0.1, 8.0, 128)
    g = get_codec("nvfp4").global_scale_for(x)
    six, chosen = fk.quantize(x, "nvfp4", global_scale=g), fk.quantize(x, "nvfp4_4over6", global_scale=g)
    six_error, chosen_error = _block_max_errors(x, six), _block_max_errors(x, chosen)
    assert np.all(chosen_error <= six_error)
    changed = np.asarray(chosen.scales.astype(jnp.float32) != six.scales.astype(jnp.float32))
    assert 0.1 < changed.mean() < 0.9  # both candidates are taken
    np.testing.assert_array_equal(chosen_error[~changed], six_error[~changed])
    assert float(jnp.mean((fk.dequantize(chosen) - x) ** 2)) < float(jnp.mean((fk.dequantize(six) - x) ** 2))


def test_it_decodes_as_nvfp4_and_keeps_non_finite_blocks_visible():
    x = jax.random.normal(jax.random.key(1), (2, 64)).at[1, 20].set(jnp.inf)
    q = fk.quantize(x, "nvfp4_4over6")
    as_nvfp4 = fk.dequantize(fk.QuantizedTensor(q.data, q.scales, q.global_scale, "nvfp4"))
    np.testing.assert_array_equal(np.asarray(fk.dequantize(q)), np.asarray(as_nvfp4))
    out = np.asarray(fk.dequantize(q))
    assert np.all(np.isnan(out[1, 16:32])) and np.all(np.isfinite(np.delete(out[1], np.s_[16:32])))
