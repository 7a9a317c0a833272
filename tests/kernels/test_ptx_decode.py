"""The inline-PTX E2M1 decode equals the portable decode, bit for bit (GPU only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from fp4kv_jax import get_codec

ROWS, BYTES = 16, 64  # head_dim 128


def _scales(fmt, key):
    blocks = 2 * BYTES // get_codec(fmt).block_size
    if fmt == "nvfp4":
        magnitudes = jax.random.uniform(key, (ROWS, blocks), minval=2.0**-9, maxval=448.0)
        return magnitudes.astype(jnp.float8_e4m3fn)
    # Exponents -57 to 61: the PTX path's documented range (|x| below about 2**64),
    # kept above the float32 subnormals that XLA flushes in the portable path.
    return jax.random.randint(key, (ROWS, blocks), 70, 189).astype(jnp.uint8).at[0, 0].set(255)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "mxfp4", "nvfp4"])
def test_ptx_decode_matches_portable_decode(fmt):
    codec = get_codec(fmt)
    data = (jnp.arange(ROWS * BYTES) % 256).astype(jnp.uint8).reshape(ROWS, BYTES)
    scales = _scales(fmt, jax.random.key(0))

    def kernel(data_ref, scales_ref, even_ref, odd_ref):
        even, odd = codec.decode_planes(data_ref[...], scales_ref[...], ptx=True)
        even_ref[...] = even.astype(jnp.float32)
        odd_ref[...] = odd.astype(jnp.float32)

    plane = jax.ShapeDtypeStruct((ROWS, BYTES), jnp.float32)
    got = pl.pallas_call(kernel, out_shape=[plane, plane])(data, scales)
    expected = jax.jit(lambda d, s: codec.decode_planes(d, s, ptx=False))(data, scales)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e, np.float32))
