"""One decode-attention call at the target shape, for a profiler (GPU only).

    ncu --clock-control none -k regex:decode python benchmarks/profile_decode_attention.py \
        --format fp4_e2m1 --implementation pallas_mosaic_warp

Runs the op twice (compile, then the profiled call) on the inputs
`decode_attention.py` times.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from common import realistic_kv
from decode_attention import TARGET, stored_layer
from fp4kv_jax.kernels.decode_attention import IMPLEMENTATIONS, decode_attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="fp4_e2m1")
    parser.add_argument("--implementation", default="pallas_mosaic_warp", choices=IMPLEMENTATIONS[1:])
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("profile_decode_attention.py: needs a GPU.", file=sys.stderr)
        return 2
    b, s, hq, hkv, d = (TARGET[n] for n in ("batch", "context", "heads", "kv_heads", "head_dim"))
    k, v = realistic_kv(jax.random.key(2), b, hkv, s, d)
    layer = stored_layer(k, v, args.format)
    q = jax.random.normal(jax.random.key(3), (b, hq, d), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)
    step = jax.jit(lambda q, layer, lengths: decode_attention(q, layer, lengths, implementation=args.implementation))
    for _ in range(2):
        jax.block_until_ready(step(q, layer, lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
