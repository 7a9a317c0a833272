"""How much of `quantize_into_cache`'s time is the encoding arithmetic (GPU only).

    python benchmarks/bound_quantize_into_cache.py [--formats fp8_e4m3,fp4_e2m1,nvfp4,mxfp4]

Times the bulk write of `quantize_into_cache.py` (B=8, T=8192, 8 KV heads, D=128, bf16
values, capacity 16384) two ways in one run, beside the copy bandwidth: with the
codec's encoder as shipped, and with a stand-in that keeps the loads, the block maxima,
the packing and the stores but rounds nothing (each code is four bits of its value's
float32 bits, each block scale a byte of its maximum). The stand-in writes garbage: it
is a bound, not an encoder. If it is no faster, the encoder's arithmetic is hidden and
the loads, stores and grid set the pace; if it reaches the copy rate, the rounding is
what is left to make cheaper.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from common import copy_bandwidth_tbs, formats_arg, run_header
from fp4kv_jax import get_codec
from fp4kv_jax.formats import e2m1
from quantize_into_cache import CASES, HEAD_DIM, KV_HEADS, fresh_cache, median_ms_donating, new_values, writer


def unrounded_encoder(codec):
    """`Codec.encode_planes` for `codec`'s shapes and dtypes that does no rounding."""
    def encode_planes(planes, global_scale, *, ptx):
        del global_scale, ptx
        bits = [jax.lax.bitcast_convert_type(p, jnp.uint32) for p in planes]
        codes = [(b >> 28).astype(jnp.uint8) for b in bits]
        data = codes[0] if len(codes) == 1 else e2m1.pack_planes(*codes)
        data = jax.lax.bitcast_convert_type(data, codec.data_dtype)
        if codec.block_size is None:
            return data, None
        absmax, _ = e2m1.block_absmax(e2m1.plane_blocks(tuple(planes), codec.block_size))
        scale_bits = jax.lax.bitcast_convert_type(absmax, jnp.uint32) >> 23
        return data, jax.lax.bitcast_convert_type(scale_bits.astype(jnp.uint8), codec.scale_dtype)

    return encode_planes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp8_e4m3,fp4_e2m1,nvfp4,mxfp4")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("bound_quantize_into_cache.py: needs a GPU.", file=sys.stderr)
        return 2
    formats = formats_arg(parser, args.formats)
    print(run_header())
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy bandwidth: {copy_tbs:.2f} TB/s (read + write)")
    case = CASES["bulk"]
    batch, tokens, capacity = case["batch"], case["tokens"], case["capacities"][0]
    new = new_values(jax.random.key(1), batch, tokens)
    start = jnp.linspace(0, capacity - tokens, batch).astype(jnp.int32)
    lines = ["| cache | shipped: ms (of copy) | no rounding (bound): ms (of copy) |", "|---|---:|---:|"]
    for fmt in formats:
        codec = get_codec(fmt)
        moved = new.nbytes + batch * tokens * KV_HEADS * codec.bytes_per_vector(HEAD_DIM)
        cells, written = [], []
        for encode in (None, unrounded_encoder(codec)):
            if encode is not None:
                codec.encode_planes = encode  # an instance attribute shadows the method
            jax.clear_caches()  # the op's jit would otherwise reuse the shipped encoder's trace
            try:
                step = writer("pallas_triton", {})
                written.append(np.asarray(step(fresh_cache(fmt, batch, capacity, None), new, start).data))
                ms = median_ms_donating(step, fresh_cache(fmt, batch, capacity, None), new, start)
            finally:
                codec.__dict__.pop("encode_planes", None)
            cells.append(f"{ms:.4f} ({moved / (ms * 1e-3) / 1e12 / copy_tbs:.1%})")
        differs = not np.array_equal(written[0].view(np.uint8), written[1].view(np.uint8))
        print(f"{fmt}: shipped {cells[0]}, bound {cells[1]}; the bound wrote other bytes: {differs}", flush=True)
        lines.append(f"| {fmt} | {cells[0]} | {cells[1]} |")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
