"""An exploration for issue 7's pure-FP4 goal: `fp4kv ablate` with each NVFP4 block
scale searched over the e4m3 grid. Plain nvfp4 rounds absmax / 6 to e4m3; Four Over
Six (`nvfp4_4over6`) also tries absmax / 4. Here every block tries the e4m3 value
nearest absmax / 6, the next `--steps` e4m3 values above it (each 11% to 13% larger;
four steps reach about absmax / 4) and `--below` values under it (which clip the
largest values to 6), and keeps the one with the smallest squared error (or, with
`--by max`, the smallest largest error, the criterion of `nvfp4_4over6`).
The bytes decode as plain nvfp4, so only the encoder changes (the portable one, on CPU).

    python docs/ablation/scale_search_experiment.py --steps 4 [--below 1] [--by max] -- \
        --cache-dtypes nvfp4+center_keys+hadamard --out DIR

Every plain nvfp4 row of the run, recipes such as `+center_keys` included, is encoded
so; `nvfp4_4over6` rows keep their own encoder and serve as the comparison.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from fp4kv_jax import cli
from fp4kv_jax.formats import e2m1, nvfp4


def _candidate(blocks, bad, global_scale, scale_bits, by):
    """Codes and errors ("squared" or "max") of the blocks under e4m3 block scales
    `scale_bits` (uint8)."""
    block_scale = jax.lax.bitcast_convert_type(scale_bits, jnp.float8_e4m3fn)
    denom = block_scale.astype(jnp.float32) * global_scale
    y = jnp.where(denom[..., None] > 0, blocks / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    codes = jnp.where(bad[..., None], jnp.uint8(0), e2m1.with_sign(e2m1.magnitude_index_nearest_even(jnp.abs(y)), y))
    finite = jnp.where(jnp.isfinite(blocks), blocks, 0.0)
    miss = finite - e2m1.code_values(codes) * denom[..., None]
    error = jnp.sum(jnp.square(miss), axis=-1) if by == "squared" else jnp.max(jnp.abs(miss), axis=-1)
    return codes, block_scale, error


def searched_encode_planes(codec, planes, global_scale, *, ptx, steps, below=0, by="squared"):
    del ptx  # plain jnp: the experiment runs on CPU
    x = jnp.stack(planes, axis=-1).reshape(*planes[0].shape[:-1], -1)
    blocks = e2m1.block_view(x, codec.block_size)
    absmax, bad = e2m1.block_absmax((blocks,))
    wanted = jnp.minimum(absmax / e2m1.MAX_MAGNITUDE / global_scale, nvfp4.E4M3_MAX)
    first = jax.lax.bitcast_convert_type(
        e2m1.round_to_float8(jnp.where(bad, jnp.nan, wanted), jnp.float8_e4m3fn), jnp.uint8
    )
    largest = jax.lax.bitcast_convert_type(jnp.float8_e4m3fn(nvfp4.E4M3_MAX), jnp.uint8)
    best_codes, best_scale, best_error = _candidate(blocks, bad, global_scale, first, by)
    for step in [*range(1, steps + 1), *range(-1, -below - 1, -1)]:
        # Positive e4m3 values increase with their bits: one more is the next value up.
        moved = jnp.clip(first.astype(jnp.int32) + step, 1, largest.astype(jnp.int32)).astype(jnp.uint8)
        bits = jnp.where(bad | (first == 0), first, moved)
        codes, scale, error = _candidate(blocks, bad, global_scale, bits, by)
        better = error < best_error
        best_codes = jnp.where(better[..., None], codes, best_codes)
        best_scale = jnp.where(better, scale, best_scale)
        best_error = jnp.where(better, error, best_error)
    return e2m1.pack(best_codes.reshape(x.shape)), best_scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="e4m3 values above absmax / 6 to try")
    parser.add_argument("--below", type=int, default=0, help="e4m3 values below absmax / 6 to try")
    parser.add_argument("--by", choices=("squared", "max"), default="squared", help="the error a block minimizes")
    parser.add_argument("ablate_args", nargs=argparse.REMAINDER, help="after --: `fp4kv ablate` arguments")
    args = parser.parse_args()
    nvfp4.Nvfp4Codec.encode_planes = lambda codec, planes, global_scale, *, ptx: searched_encode_planes(
        codec, planes, global_scale, ptx=ptx, steps=args.steps, below=args.below, by=args.by)
    ablate_args = args.ablate_args[1:] if args.ablate_args[:1] == ["--"] else args.ablate_args
    return cli.main(["ablate", *ablate_args])


if __name__ == "__main__":
    sys.exit(main())
