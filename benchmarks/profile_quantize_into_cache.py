"""One bulk quantize-into-cache write (B=8, T=8192, 8 KV heads, D=128), for a profiler
(GPU only).

    ncu --clock-control none -k regex:quantize python benchmarks/profile_quantize_into_cache.py \
        --format fp8_e4m3

Runs the write twice (compile, then the profiled call) on the inputs
`quantize_into_cache.py` times, into a donated cache of 16384 slots.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from fp4kv_jax.cache import empty_tensor
from quantize_into_cache import CASES, HEAD_DIM, KV_HEADS, new_values, writer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="fp8_e4m3")
    parser.add_argument("--implementation", default="pallas_triton")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("profile_quantize_into_cache.py: needs a GPU.", file=sys.stderr)
        return 2
    case = CASES["bulk"]
    batch, tokens = case["batch"], case["tokens"]
    new = new_values(jax.random.key(0), batch, tokens)
    stored = empty_tensor(args.format, (batch, KV_HEADS, case["capacities"][0], HEAD_DIM))
    step = writer(args.implementation, {})
    start = jnp.zeros((batch,), jnp.int32)
    for _ in range(2):
        stored = jax.block_until_ready(step(stored, new, start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
