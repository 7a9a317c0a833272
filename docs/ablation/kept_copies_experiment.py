"""An exploration for issue 7's 0.5% goal on the Python docs at 8k context: could the
bits of the kept copies (`first=N`, `recent=N`) be spent better? Two variants of the
copies are simulated in `fp4kv ablate`'s one-pass scoring:

- `--keep keys`: only the keys are kept; the kept positions' values are read from the
  FP4 store like every other position. Half the bits a kept position, so twice the
  positions at one budget.
- `--fp8-from P`: the kept copies of positions >= P are rounded to fp8 e4m3 with one
  float32 scale a position and head (its absmax over head_dim / 448), as an fp8 kept
  buffer would hold them; positions < P stay bf16. Half the bits, so twice the positions.
- `--heavy N`: besides the first and newest positions, each KV head keeps in full
  precision the N positions that drew the most attention (summed over its query heads,
  full-precision scores) from the `recent` queries after them: what a cache could
  decide as a position leaves the recent window (H2O's heavy hitters, under KIVI's
  window). Simulated in the one-pass scoring of each window, where the chunk is the
  whole window; the bits/elem column does not count the N positions.

    python docs/ablation/kept_copies_experiment.py --keep keys -- \\
        --cache-dtypes nvfp4_search+center_keys+hadamard+hadamard_v+first=8+recent=88 --out DIR

Every row that keeps positions is changed so, in every prefill pass (the scored
windows and the greedy prompts); the greedy continuations' decode steps still read bf16
copies of K and V. The bits/elem and bytes columns still count bf16 copies of K and V;
docs/ablation/README.md gives the true figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

from fp4kv_jax import cli
from fp4kv_jax.formats import dequantize, quantize
from fp4kv_jax.models import transformer
from fp4kv_jax.rotation import hadamard_rotate


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


def _with_heavy_positions(q, layer, full_k, full_v, heavy: int):
    """The layer with each KV head's `heavy` most-attended positions (past its first
    `keep_first`) stored in full precision, as float32 tensors in the stored frame.

    q [B, T, Hq, D] the window's queries from position 0; full_k, full_v [B, Hkv, S, D]
    the window's keys and values in full precision (the chunk is the whole window)."""
    batch, chunk, num_heads, head_dim = q.shape
    kv_heads = full_k.shape[1]
    if layer.keys_rotated:
        q = hadamard_rotate(q)
    grouped = q.astype(jnp.float32).reshape(batch, chunk, kv_heads, num_heads // kv_heads, head_dim)
    # Centered keys move each query's scores by a constant: the softmax is unchanged.
    scores = jnp.einsum("bikgd,bkpd->bkgip", grouped, full_k[:, :, :chunk].astype(jnp.float32),
                        precision="highest") * head_dim**-0.5
    i, p = jnp.arange(chunk)[:, None], jnp.arange(chunk)[None, :]
    attention = jax.nn.softmax(jnp.where(p <= i, scores, -jnp.inf), axis=-1)
    while_recent = ((i > p) & (i <= p + layer.keep_recent)).astype(jnp.float32)  # [query i, position p]
    drawn = jnp.einsum("bkgip,ip->bkp", attention, while_recent)
    drawn = jnp.where(jnp.arange(chunk) >= layer.keep_first, drawn, -1.0)
    _, chosen = jax.lax.top_k(drawn, heavy)  # [B, Hkv, heavy]
    kept = jnp.zeros(full_k.shape[:3], bool).at[
        jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None], chosen
    ].set(True)[..., None]
    mixed = lambda full, stored: quantize(jnp.where(kept, full, dequantize(stored, jnp.float32)), "float32")
    return dataclasses.replace(layer, k=mixed(full_k, layer.k), v=mixed(full_v, layer.v))


def simulated_prefill(prefill, keep: str, fp8_from: int | None, heavy: int | None):
    """`prefill` (the models' prefill attention) with the kept copies it reads changed."""

    def wrapped(q, layer, start, *, full_k=None, full_v=None, **kwargs):
        if full_k is not None and heavy:
            layer = _with_heavy_positions(q, layer, full_k, full_v, heavy)
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
    parser.add_argument("--heavy", type=int, default=None, metavar="N")
    args, ablate_args = parser.parse_known_args()
    if ablate_args[:1] == ["--"]:
        ablate_args = ablate_args[1:]
    transformer.prefill_attention = simulated_prefill(transformer.prefill_attention, args.keep, args.fp8_from, args.heavy)
    return cli.main(["ablate", *ablate_args])


if __name__ == "__main__":
    sys.exit(main())
