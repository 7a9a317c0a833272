"""An exploration for issue 7's pure-FP4 goal: `fp4kv ablate` with NVFP4 block scales
chosen by Four Over Six's squared error: each block is scaled so that its absmax maps
to 6 or to 4, whichever gives the smaller squared error. The bytes decode as plain
nvfp4, so only the encoder changes (here the portable one, on CPU). The format
`nvfp4_4over6` makes the same choice by the largest error instead, which every backend
computes alike; this script keeps the squared-error results reproducible.

    python docs/ablation/four_over_six_experiment.py -- \
        --cache-dtypes nvfp4+center_keys+center_values --out DIR

Every nvfp4 row of the run, recipes such as `+center_keys` included, is encoded so.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from fp4kv_jax import cli
from fp4kv_jax.formats import e2m1, nvfp4


def _nvfp4_candidate(codec, x, global_scale, divisor):
    """Codes, e4m3 block scales and squared errors of x's blocks scaled so that their
    absmax maps to `divisor`."""
    blocks = e2m1.block_view(x, codec.block_size)
    absmax, bad = e2m1.block_absmax((blocks,))
    finite = jnp.where(jnp.isfinite(blocks), blocks, 0.0)
    wanted = jnp.minimum(absmax / divisor / global_scale, nvfp4.E4M3_MAX)
    block_scale = e2m1.round_to_float8(jnp.where(bad, jnp.nan, wanted), jnp.float8_e4m3fn)
    denom = block_scale.astype(jnp.float32) * global_scale
    y = jnp.where(denom[..., None] > 0, blocks / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    codes = jnp.where(bad[..., None], jnp.uint8(0), e2m1.with_sign(e2m1.magnitude_index_nearest_even(jnp.abs(y)), y))
    error = jnp.sum(jnp.square(finite - e2m1.code_values(codes) * denom[..., None]), axis=-1)
    return codes, block_scale, error


def four_over_six_encode_planes(codec, planes, global_scale, *, ptx):
    del ptx  # plain jnp: the experiment runs on CPU
    x = jnp.stack(planes, axis=-1).reshape(*planes[0].shape[:-1], -1)
    codes6, scales6, error6 = _nvfp4_candidate(codec, x, global_scale, 6.0)
    codes4, scales4, error4 = _nvfp4_candidate(codec, x, global_scale, 4.0)
    four = error4 < error6
    codes = jnp.where(four[..., None], codes4, codes6).reshape(x.shape)
    return e2m1.pack(codes), jnp.where(four, scales4, scales6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablate_args", nargs=argparse.REMAINDER, help="after --: `fp4kv ablate` arguments")
    args = parser.parse_args()
    nvfp4.Nvfp4Codec.encode_planes = four_over_six_encode_planes
    ablate_args = args.ablate_args[1:] if args.ablate_args[:1] == ["--"] else args.ablate_args
    return cli.main(["ablate", *ablate_args])


if __name__ == "__main__":
    sys.exit(main())
