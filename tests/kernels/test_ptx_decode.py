"""The inline-PTX E2M1 decodes (the Triton kernels' in registers, the Mosaic kernels'
of a shared-memory tile) equal the portable decode, bit for bit (GPU only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from fp4kv_jax import get_codec

ROWS, BYTES = 16, 64  # head_dim 128


def _scales(fmt, key, rows=ROWS, width=BYTES):
    blocks = 2 * width // get_codec(fmt).block_size
    if get_codec(fmt).scale_dtype == jnp.float8_e4m3fn:
        magnitudes = jax.random.uniform(key, (rows, blocks), minval=2.0**-9, maxval=448.0)
        return magnitudes.astype(jnp.float8_e4m3fn)
    # Exponents -57 to 61: the PTX path's documented range (|x| below about 2**64),
    # kept above the float32 subnormals that XLA flushes in the portable path.
    return jax.random.randint(key, (rows, blocks), 70, 189).astype(jnp.uint8).at[0, 0].set(255)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "mxfp4", "nvfp4", "nvfp4_search_b8", "nvfp4_search_b4"])
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


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "mxfp4", "nvfp4", "nvfp4_search_b8", "nvfp4_search_b4"])
@pytest.mark.parametrize("width", [32, 64])  # head_dim 64 and 128
def test_mosaic_tile_decode_matches_portable_decode(fmt, width):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from fp4kv_jax.kernels import mosaic_tiles
    from fp4kv_jax.kernels.decode_attention import pallas_mosaic

    codec, rows = get_codec(fmt), 64
    data = (jnp.arange(rows * width) % 256).astype(jnp.uint8).reshape(rows, width)
    # A non-finite block holds zero codes, as every encoder writes it; the tile decode
    # may then read its scale as inf rather than NaN (Codec.plane_scale_pair_ptx).
    data = data.at[0, : codec.block_size // 2].set(0)
    scales = _scales(fmt, jax.random.key(1), rows, width)
    scale_rows = mosaic_tiles.scale_rows(scales[None, None])[0, 0]

    def kernel(data_ref, scales_ref, out_ref, data_smem, scales_smem, tile, barrier):
        plgpu.copy_gmem_to_smem(data_ref, data_smem, barrier)
        plgpu.copy_gmem_to_smem(scales_ref, scales_smem, barrier)
        plgpu.barrier_wait(barrier)
        mosaic_tiles.decode_tile_ptx(codec, data_smem, scales_smem, tile)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tile, out_ref)
        plgpu.wait_smem_to_gmem(0)

    got = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((rows, 2 * width), jnp.bfloat16),
        scratch_types=(
            plgpu.SMEM(data.shape, jnp.uint8),
            plgpu.SMEM(scale_rows.shape, jnp.uint8),
            mosaic_tiles.swizzled_tile(rows, 2 * width),
            plgpu.Barrier(num_arrivals=2),
        ),
        compiler_params=pallas_mosaic.COMPILER_PARAMS,
    )(data, scale_rows)
    even, odd = jax.jit(lambda d, s: codec.decode_planes(d, s, ptx=False))(data, scales)
    expected = jnp.stack([even, odd], axis=-1).reshape(rows, 2 * width).astype(jnp.bfloat16)  # channel order
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
