"""An exploration for issue 7's 0.5% goal on the Python docs at 8k context: could the
bits of the kept copies (`first=N`, `recent=N`) be spent better? Two variants of the
copies are simulated in `fp4kv ablate`'s one-pass scoring:

- `--keep keys`: only the keys are kept; the kept positions' values are read from the
  FP4 store like every other position. Half the bits a kept position, so twice the
  positions at one budget.
- `--fp8-from P`: the kept copies of positions >= P are rounded to fp8 e4m3 with one
  float32 scale a position and head (its absmax over head_dim / 448), as an fp8 kept
  buffer would hold them; positions < P stay bf16. Half the bits, so twice the positions.

    python docs/ablation/kept_copies_experiment.py --keep keys -- \\
        --cache-dtypes nvfp4_search+center_keys+hadamard+hadamard_v+first=8+recent=88 --out DIR

Every row that keeps positions is changed so, in every prefill pass (the scored
windows and the greedy prompts); the greedy continuations' decode steps still read bf16
copies of K and V. The bits/elem and bytes columns still count bf16 copies of K and V;
docs/ablation/README.md gives the true figures.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from fp4kv_jax import cli
from fp4kv_jax.formats import dequantize
from fp4kv_jax.models import transformer


def _as_bf16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _fp8_per_position(x, first_position: int):
    """x [B, Hkv, capacity, D] with positions >= first_position rounded to e4m3 by
    their own absmax scale."""
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 448.0
    scale = jnp.where(scale > 0, scale, 1.0)
    rounded = (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
    positions = jnp.arange(x.shape[2])[None, None, :, None]
    return jnp.where(positions >= first_position, rounded, x)


def simulated_prefill(prefill, keep: str, fp8_from: int | None):
    """`prefill` (the models' prefill attention) with the kept copies it reads changed."""

    def wrapped(q, layer, start, *, full_k=None, full_v=None, **kwargs):
        if full_k is not None:
            if keep == "keys":  # a ring layer keeps no positions, so slot = position here
                full_v = _as_bf16(dequantize(layer.v, jnp.float32))
            if fp8_from is not None:
                full_k, full_v = (_fp8_per_position(x, fp8_from) for x in (full_k, full_v))
        return prefill(q, layer, start, full_k=full_k, full_v=full_v, **kwargs)

    return wrapped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", choices=("keys", "both"), default="both")
    parser.add_argument("--fp8-from", type=int, default=None, metavar="P")
    args, ablate_args = parser.parse_known_args()
    if ablate_args[:1] == ["--"]:
        ablate_args = ablate_args[1:]
    transformer.prefill_attention = simulated_prefill(transformer.prefill_attention, args.keep, args.fp8_from)
    return cli.main(["ablate", *ablate_args])


if __name__ == "__main__":
    sys.exit(main())
