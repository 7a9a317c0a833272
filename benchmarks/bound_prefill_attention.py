"""How much of the Mosaic prefill kernel's time is the cache decode (GPU only).

    python benchmarks/bound_prefill_attention.py [--format nvfp4] [--head-dim 128]

Times `pallas_mosaic` on the workloads of `prefill_attention.py` three ways in one run,
beside cuDNN bf16: as shipped; with a third TMA stage (`num_stages=3`); and with the
feeding warpgroup's decode replaced by nothing, so the compute warpgroups read
whatever the tiles hold. The last computes garbage: it is a bound, not a kernel. If
it is barely faster, the decode is hidden and the compute warpgroups set the pace.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from common import median_ms, realistic_kv, run_header
from prefill_attention import HEADS, KV_HEADS, WORKLOADS
from fp4kv_jax import quantize
from fp4kv_jax.cache import LayerCache
from fp4kv_jax.kernels import mosaic_tiles
from fp4kv_jax.kernels.prefill_attention import pallas_mosaic, prefill_attention


def no_decode(codec, data_ref, scales_ref, out_ref):
    del codec, data_ref, scales_ref, out_ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="nvfp4", choices=pallas_mosaic.SUPPORTED_FORMATS)
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("bound_prefill_attention.py: needs a GPU.", file=sys.stderr)
        return 2
    print(run_header())
    shipped = mosaic_tiles.decode_tile_ptx
    for name, (prefix, chunk) in WORKLOADS.items():
        k, v = realistic_kv(jax.random.key(2), 1, KV_HEADS, prefix + chunk, args.head_dim)
        q = jax.random.normal(jax.random.key(3), (1, chunk, HEADS, args.head_dim), jnp.bfloat16)
        k_bthd, v_bthd = (x.transpose(0, 2, 1, 3).astype(jnp.bfloat16) for x in (k, v))
        cudnn = jax.jit(lambda q, k, v, causal=prefix == 0: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"))
        cudnn_ms = median_ms(cudnn, q, k_bthd, v_bthd, repeats=10, calls=3)
        print(f"{name} D={args.head_dim} cudnn bf16: {cudnn_ms:.3f} ms")
        layer = LayerCache(k=quantize(k, args.format), v=quantize(v, args.format), window=None, ring=False)
        start = jnp.array([prefix], jnp.int32)
        outputs = {}
        for label, tuning, decode in (("shipped", {}, shipped), ("num_stages=3", dict(num_stages=3), shipped),
                                      ("no decode (bound)", {}, no_decode)):
            mosaic_tiles.decode_tile_ptx = decode  # read when the op is traced
            jax.clear_caches()  # the op's jit would otherwise reuse the shipped decode's trace
            op = jax.jit(lambda q, layer, start, tuning=tuning: prefill_attention(
                q, layer, start, implementation="pallas_mosaic", **tuning))
            outputs[label] = op(q, layer, start)
            ms = median_ms(op, q, layer, start, repeats=10, calls=3)
            print(f"{name} D={args.head_dim} {args.format} {label}: {ms:.3f} ms, {cudnn_ms / ms:.2f}x cuDNN")
        mosaic_tiles.decode_tile_ptx = shipped
        same = bool(jnp.array_equal(outputs["shipped"], outputs["no decode (bound)"], equal_nan=True))
        print(f"{name} D={args.head_dim}: the bound's output differs from the shipped kernel's: {not same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
