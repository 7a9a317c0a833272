"""GPU benchmark of writing new K (or V) into a large cache, for every cache format.

In one run it measures:
  copy       the device-to-device copy bandwidth (bytes read plus written), the ceiling;
  reference  `quantize` of the chunk, then a scatter of its rows (XLA);
  ours       the one-pass Pallas kernel, for each tuning variant;
  round_keys with --round-keys, for packed FP4 formats: query-aware key rounding
             (`fp4kv_jax.key_rounding`, XLA), then the same scatter as the reference;
for a decode step (T=1, B=64), a prefill chunk (T=2048, B=1) and a bulk write (T=8192,
B=8), each into caches of two capacities 4x to 8x apart. Every call donates the cache and gets it back, as a model step
does, so a time that grows with the capacity would be a copy of the whole cache. The
decode cache stops at 32768 slots: at 65536 an fp8 tensor is exactly 4 GiB, which the
kernel refuses (`fp4kv_jax.kernels.tiles.overflows_int32_offsets`). Speed is the
bytes moved (new values read, stored rows written) per second, against the copy
bandwidth. The kernel is first checked against the reference, bit for bit.

    python benchmarks/quantize_into_cache.py                  # every format
    python benchmarks/quantize_into_cache.py --formats nvfp4 --variants "block_t=32;block_t=128"
    python benchmarks/quantize_into_cache.py --out DIR        # also write results.json there
    python benchmarks/quantize_into_cache.py --formats nvfp4_search --round-keys
    python benchmarks/quantize_into_cache.py --cases bulk --global-scale 0.09
                                   # fp8 and nvfp4 caches with a calibrated-like global scale
                                   # (default: a fresh cache's 1.0, a power of two)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import copy_bandwidth_tbs, formats_arg, run_header, variants_arg
from fp4kv_jax import format_names, get_codec, key_rounding
from fp4kv_jax.cache import empty_tensor
from fp4kv_jax.kernels.quantize_into_cache import quantize_into_cache, write_rows

KV_HEADS, HEAD_DIM = 8, 128
CASES = {
    "decode": dict(batch=64, tokens=1, capacities=(4096, 32768)),
    "prefill": dict(batch=1, tokens=2048, capacities=(16384, 131072)),
    # Large enough (134 MB of new bf16 values) that a call's time is the GPU's, not
    # the dispatch's.
    "bulk": dict(batch=8, tokens=8192, capacities=(16384, 65536)),
}


def new_values(key, batch, tokens):
    """bf16 [B, T, Hkv, D]: normals with four outlier channels (x8), like RoPE'd keys."""
    x = jax.random.normal(key, (batch, tokens, KV_HEADS, HEAD_DIM), jnp.float32)
    return x.at[..., jnp.array([5, 17, 70, 101])].multiply(8.0).astype(jnp.bfloat16)


def stored_bytes(q) -> list[np.ndarray]:
    arrays = (q.data,) if q.scales is None else (q.data, q.scales)
    return [np.asarray(x).view(np.uint8) for x in arrays]


def rounding_factor() -> jax.Array:
    """A [Hkv, D, D] key-rounding factor from random anisotropic query moments (the
    time does not depend on the values)."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(KV_HEADS, HEAD_DIM, HEAD_DIM)) * np.exp(rng.normal(size=HEAD_DIM))[:, None]
    return key_rounding.rounding_factor(mixing @ mixing.swapaxes(-1, -2) / HEAD_DIM, rotated=False)


def writer(implementation: str, variant: dict):
    """A jitted step (stored, new, start) -> stored that donates the cache it writes."""
    def write(stored, new, start):
        if implementation == "round_keys":
            data, scales = key_rounding.round_keys(
                new.astype(jnp.float32), stored.fmt, stored.global_scale, rounding_factor()
            )
            counts = jnp.full(start.shape, new.shape[1], jnp.int32)
            return write_rows(stored, data, scales, start, counts, ring=False)
        return quantize_into_cache(new, stored, start, implementation=implementation, **variant)

    return jax.jit(write, donate_argnums=0)


def median_ms_donating(step, stored, *args, repeats: int = 30, calls: int = 10) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back steps, in ms; each
    step consumes the cache the previous one returned."""
    stored = jax.block_until_ready(step(stored, *args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            stored = step(stored, *args)
        jax.block_until_ready(stored)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def fresh_cache(fmt: str, batch: int, capacity: int, global_scale: float | None):
    """An empty cache tensor [B, Hkv, capacity, D]; formats with a global scale get
    `global_scale` (None: the fresh cache's own, 1.0)."""
    stored = empty_tensor(fmt, (batch, KV_HEADS, capacity, HEAD_DIM))
    if global_scale is None or stored.global_scale is None:
        return stored
    return dataclasses.replace(stored, global_scale=jnp.float32(global_scale))


def check_correctness(formats, global_scale) -> list[dict]:
    """Compiled kernel vs reference on ragged starts, two running past the capacity."""
    rows = []
    batch, tokens, capacity = 4, 300, 4096
    new = new_values(jax.random.key(0), batch, tokens)
    start = jnp.array([0, 17, 3900, 4095], jnp.int32)
    for fmt in formats:
        written = {}
        for implementation in ("reference", "pallas_triton"):
            stored = fresh_cache(fmt, batch, capacity, global_scale)
            written[implementation] = stored_bytes(writer(implementation, {})(stored, new, start))
        same = all(np.array_equal(a, b) for a, b in zip(written["reference"], written["pallas_triton"]))
        rows.append(dict(fmt=fmt, bit_identical=same))
    return rows


def time_case(case, capacity, fmt, variants, copy_tbs, global_scale, round_keys: bool) -> list[dict]:
    batch, tokens = CASES[case]["batch"], CASES[case]["tokens"]
    new = new_values(jax.random.key(1), batch, tokens)
    # Sequences at different lengths, none past the capacity.
    start = jnp.linspace(0, capacity - tokens, batch).astype(jnp.int32)
    moved = new.nbytes + batch * tokens * KV_HEADS * get_codec(fmt).bytes_per_vector(HEAD_DIM)
    runs = [("reference", {})] + [("ours", variant) for variant in variants]
    if round_keys and key_rounding.rounds(fmt):
        runs.append(("round_keys", {}))
    rows = []
    for impl, variant in runs:
        implementation = "pallas_triton" if impl == "ours" else impl
        stored = fresh_cache(fmt, batch, capacity, global_scale)
        try:
            ms = median_ms_donating(writer(implementation, variant), stored, new, start)
        except Exception as error:  # a variant that does not compile is reported, not fatal
            print(f"{fmt} {impl} {variant}: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
            continue
        tbs = moved / (ms * 1e-3) / 1e12
        rows.append(dict(case=case, batch=batch, tokens=tokens, capacity=capacity, fmt=fmt,
                         impl=impl, variant=variant, ms=ms, bytes=moved, tbs=tbs,
                         of_copy=tbs / copy_tbs))
    return rows


def table(rows) -> str:
    lines = [
        "| case | B | T | capacity | cache | impl | variant | ms | MB moved | TB/s | of copy |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        variant = ",".join(f"{k}={v}" for k, v in r["variant"].items()) or "-"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['tokens']} | {r['capacity']} | {r['fmt']} | "
            f"{r['impl']} | {variant} | {r['ms']:.4f} | {r['bytes'] / 1e6:.2f} | "
            f"{r['tbs']:.3f} | {r['of_copy']:.1%} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=",".join(format_names()))
    parser.add_argument("--variants", default="", help="';'-separated k=v,k=v tuning sets; empty: the defaults")
    parser.add_argument("--cases", default=",".join(CASES), help=f"any of {', '.join(CASES)}")
    parser.add_argument("--global-scale", type=float,
                        help="global scale of fp8 and nvfp4 caches (default: a fresh cache's 1.0)")
    parser.add_argument("--round-keys", action="store_true",
                        help="also time query-aware key rounding for packed FP4 formats")
    parser.add_argument("--out", type=Path, help="directory for results.json")
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"--cases: unknown {', '.join(unknown)}; valid: {', '.join(CASES)}")
    if args.global_scale is not None and not (0 < args.global_scale < float("inf")):
        parser.error(f"--global-scale: expected a positive finite number, got {args.global_scale}")
    if jax.default_backend() != "gpu":
        print("quantize_into_cache.py: needs a GPU.", file=sys.stderr)
        return 2
    formats = formats_arg(parser, args.formats)
    variants = variants_arg(args.variants)
    device = jax.devices()[0]
    print(run_header())
    checks = check_correctness(formats, args.global_scale)
    for c in checks:
        print(f"check {c['fmt']:9s}: bit-identical to the reference: {c['bit_identical']}")
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy bandwidth: {copy_tbs:.2f} TB/s (read + write)")
    rows = []
    for case in cases:
        for capacity in CASES[case]["capacities"]:
            case_rows = []
            for fmt in formats:
                case_rows += time_case(case, capacity, fmt, variants, copy_tbs, args.global_scale, args.round_keys)
            print(table(case_rows), flush=True)
            rows += case_rows
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            dict(device=device.device_kind, jax=jax.__version__, copy_tbs=copy_tbs,
                 global_scale=args.global_scale,
                 checks=checks, rows=rows), indent=1))
    print("\n" + table(rows))
    return 0 if all(c["bit_identical"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
