"""GPU benchmark of decode attention over every cache format, with its baselines.

In one run it measures:
  copy   the device-to-device copy bandwidth (bytes read plus written), the ceiling;
  cudnn  jax.nn.dot_product_attention(implementation="cudnn") over a bf16 cache;
  unfused  jnp dequantize of the whole cache, then cuDNN (SGLang's approach);
  ours   the fused Pallas kernels (pallas_triton; pallas_mosaic and pallas_mosaic_warp
         for packed FP4), for each format and tuning variant;
and first checks the kernel against the float32 reference on a small shape for every
format. Speed is reported as a ratio to cuDNN bf16 from the same run.

    python benchmarks/decode_attention.py                 # the target shape only
    python benchmarks/decode_attention.py --sweep         # batch x context x heads sweep
    python benchmarks/decode_attention.py --out DIR       # also write results.json there
    python benchmarks/decode_attention.py --variants "block_k=64;block_k=64,rotated=1"
                                                          # rotated=1: Hadamard-rotated keys
    python benchmarks/decode_attention.py --implementations pallas_triton --variants ";keep_first=32,keep_recent=128"
                                                          # bf16 copies of the first 32 and newest 128
    python benchmarks/decode_attention.py --implementations pallas_mosaic_warp --variants "prefetch=0;"
                                                          # an empty variant: the defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from common import copy_bandwidth_tbs, formats_arg, median_ms, realistic_kv, run_header, variants_arg
from fp4kv_jax import get_codec, quantize
from fp4kv_jax.cache import LayerCache, kept_slot_positions
from fp4kv_jax.formats import dequantize
from fp4kv_jax.kernels.decode_attention import IMPLEMENTATIONS, decode_attention
from fp4kv_jax.kernels.decode_attention import pallas_mosaic, pallas_mosaic_warp

TARGET = dict(batch=32, context=8192, heads=64, kv_heads=8, head_dim=128)


def handles(implementation: str, fmt: str) -> bool:
    for module in (pallas_mosaic, pallas_mosaic_warp):
        if implementation == module.__name__.rsplit(".", 1)[-1]:
            return fmt in module.SUPPORTED_FORMATS
    return True


def stored_layer(k, v, fmt, window=None):
    return LayerCache(k=quantize(k, fmt), v=quantize(v, fmt), window=window, ring=False)


def keeping_positions(layer, k, v, lengths, keep_first: int, keep_recent: int):
    """The layer with bf16 copies of each sequence's first `keep_first` and newest
    `keep_recent` positions of k, v [B, Hkv, S, D], in `LayerCache.kept_k`'s slots."""
    layer = dataclasses.replace(layer, keep_first=keep_first, keep_recent=keep_recent)
    positions = jnp.maximum(kept_slot_positions(layer, lengths), 0)  # all held in a full cache
    take = jax.vmap(lambda x, p: x[:, p].astype(jnp.bfloat16))
    return dataclasses.replace(layer, kept_k=take(k, positions), kept_v=take(v, positions))


def check_correctness(formats, implementations) -> list[dict]:
    """Kernels vs float32 reference on fresh inputs, ragged lengths, GQA 8, D=128."""
    rows = []
    batch, kv_heads, context, head_dim, heads = 4, 2, 1024, 128, 16
    k, v = realistic_kv(jax.random.key(0), batch, kv_heads, context, head_dim)
    q = jax.random.normal(jax.random.key(1), (batch, heads, head_dim), jnp.bfloat16)
    lengths = jnp.array([1, 17, 640, 1000], jnp.int32)
    for fmt in formats:
        for window, sinks in ((None, None), (128, jnp.linspace(-1, 2, heads))):
            layer = stored_layer(k, v, fmt, window)
            ref = decode_attention(q, layer, lengths, sinks=sinks, implementation="reference")
            ref32 = ref.astype(jnp.float32)
            for implementation in implementations:
                if not handles(implementation, fmt):
                    continue
                try:
                    out = decode_attention(q, layer, lengths, sinks=sinks, implementation=implementation)
                except Exception as error:  # reported as a failed check, not fatal
                    print(f"check {fmt} {implementation}: {type(error).__name__}: {str(error)[:2000]}",
                          file=sys.stderr)
                    out = jnp.full_like(ref, jnp.nan)
                out32 = out.astype(jnp.float32)
                err = float(jnp.linalg.norm(out32 - ref32) / jnp.linalg.norm(ref32))
                finite = bool(jnp.all(jnp.isfinite(out32)))
                rows.append(dict(fmt=fmt, impl=implementation, window=window, sinks=sinks is not None,
                                 rel_err=err, finite=finite))
    return rows


def time_shape(shape, formats, implementations, variants, copy_tbs) -> list[dict]:
    b, s, hq, hkv, d = (shape[n] for n in ("batch", "context", "heads", "kv_heads", "head_dim"))
    k, v = realistic_kv(jax.random.key(2), b, hkv, s, d)
    q = jax.random.normal(jax.random.key(3), (b, hq, d), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)
    rows = []

    # cuDNN wants [B, T, H, D]; give it its preferred layout, the strongest baseline.
    k_bthd = k.transpose(0, 2, 1, 3).astype(jnp.bfloat16)
    v_bthd = v.transpose(0, 2, 1, 3).astype(jnp.bfloat16)
    cudnn = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0]
    )
    cudnn_ms = median_ms(cudnn, q, k_bthd, v_bthd)
    kv_bytes = k_bthd.nbytes + v_bthd.nbytes
    rows.append(dict(shape=shape, impl="cudnn", fmt="bf16", ms=cudnn_ms, bytes=kv_bytes))
    del k_bthd, v_bthd

    for fmt in formats:
        layer = stored_layer(k, v, fmt)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(layer))
        if get_codec(fmt).bits_per_element(128) < 16:

            def unfused(q, layer):
                kk = dequantize(layer.k, jnp.bfloat16).transpose(0, 2, 1, 3)
                vv = dequantize(layer.v, jnp.bfloat16).transpose(0, 2, 1, 3)
                return jax.nn.dot_product_attention(q[:, None], kk, vv, implementation="cudnn")[:, 0]

            ms = median_ms(jax.jit(unfused), q, layer)
            rows.append(dict(shape=shape, impl="unfused", fmt=fmt, ms=ms, bytes=nbytes))
        for implementation in implementations:
            if not handles(implementation, fmt):
                continue
            for variant in variants:
                # `rotated=1` times a layer whose keys are stored Hadamard-rotated: the op
                # then rotates the queries too (the same kernel otherwise); keep_first and
                # keep_recent a layer keeping those positions in bf16 (KIVI's window).
                layer_options = ("rotated", "keep_first", "keep_recent")
                tuning = {key: value for key, value in variant.items() if key not in layer_options}
                timed = dataclasses.replace(layer, keys_rotated=bool(variant.get("rotated", 0)))
                if variant.get("keep_first", 0) + variant.get("keep_recent", 0):
                    timed = keeping_positions(timed, k, v, lengths, variant.get("keep_first", 0),
                                              variant.get("keep_recent", 0))
                fused = jax.jit(lambda q, layer, lengths, tuning=tuning, implementation=implementation:
                                decode_attention(q, layer, lengths, implementation=implementation, **tuning))
                try:
                    ms = median_ms(fused, q, timed, lengths)
                except Exception as error:  # a variant that does not compile is reported, not fatal
                    print(f"{fmt} {implementation} {variant}: {type(error).__name__}: {str(error)[:300]}",
                          file=sys.stderr)
                    continue
                rows.append(dict(shape=shape, impl=implementation, fmt=fmt, variant=variant, ms=ms, bytes=nbytes))
        del layer
    for row in rows:
        row["tbs"] = row["bytes"] / (row["ms"] * 1e-3) / 1e12
        row["of_copy"] = row["tbs"] / copy_tbs
        row["speedup_vs_cudnn"] = cudnn_ms / row["ms"]
    return rows


def table(rows) -> str:
    lines = [
        "| B | S | Hq/Hkv | D | impl | cache | variant | ms | TB/s | of copy | vs cuDNN bf16 |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["shape"]
        variant = ",".join(f"{k}={v}" for k, v in r.get("variant", {}).items()) or "-"
        lines.append(
            f"| {s['batch']} | {s['context']} | {s['heads']}/{s['kv_heads']} | {s['head_dim']} | "
            f"{r['impl']} | {r['fmt']} | {variant} | {r['ms']:.3f} | {r['tbs']:.2f} | "
            f"{r['of_copy']:.0%} | {r['speedup_vs_cudnn']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="sweep batch, context and heads")
    parser.add_argument("--formats", default="bf16,fp8_e4m3,fp4_e2m1,nvfp4,mxfp4")
    parser.add_argument("--implementations", default="pallas_triton,pallas_mosaic,pallas_mosaic_warp",
                        help="comma-separated kernels to check and time")
    parser.add_argument("--variants", default="", help="';'-separated k=v,k=v tuning sets; empty: the defaults")
    parser.add_argument("--out", type=Path, help="directory for results.json")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("decode_attention.py: needs a GPU.", file=sys.stderr)
        return 2
    formats = formats_arg(parser, args.formats)
    variants = variants_arg(args.variants)
    implementations = args.implementations.split(",")
    for implementation in implementations:
        if implementation not in IMPLEMENTATIONS[1:]:
            parser.error(f"--implementations: unknown {implementation!r}; valid: {', '.join(IMPLEMENTATIONS[1:])}")
    device = jax.devices()[0]
    print(run_header())
    checks = check_correctness(formats, implementations)
    for c in checks:
        print(f"check {c['fmt']:9s} {c['impl']:13s} window={c['window']} sinks={c['sinks']}: "
              f"rel_err={c['rel_err']:.2e} finite={c['finite']}", flush=True)
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy bandwidth: {copy_tbs:.2f} TB/s (read + write)")
    shapes = [TARGET]
    if args.sweep:
        shapes = [
            dict(batch=b, context=s, heads=64, kv_heads=8, head_dim=d)
            for d in (128, 64)
            for b, s in ((1, 131072), (8, 32768), (32, 8192), (64, 4096), (128, 1024))
        ]
    rows = []
    for shape in shapes:
        shape_rows = time_shape(shape, formats, implementations, variants, copy_tbs)
        print(table(shape_rows), flush=True)
        rows += shape_rows
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            dict(device=device.device_kind, jax=jax.__version__, copy_tbs=copy_tbs,
                 checks=checks, rows=rows), indent=1, default=str))
    print("\n" + table(rows))
    bad = [c for c in checks if not c["finite"] or c["rel_err"] > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
