"""GPU benchmark of prefill attention over a stored cache, against cuDNN bf16 flash attention.

In one run, for 64 query / 8 KV heads at D=128 and D=64, it times:
  cudnn  jax.nn.dot_product_attention(implementation="cudnn") on bf16 K/V;
  ours   fp4kv_jax.kernels.prefill_attention over each cache format, through each
         implementation that handles it (pallas_triton; pallas_mosaic for packed FP4);
for two workloads:
  prompt  an 8k prompt in one chunk (causal; cuDNN with is_causal=True);
  chunk   a 2k chunk over a 32k cached prefix. cuDNN has no bottom-right causal mask,
          so its baseline attends the whole 34k without a mask: 3% more score
          entries than the causal chunk needs (2048 x 34816 against
          2048 x 32768 + the 2048-token triangle).
TFLOP/s counts the causal work, 4 * D * (attended query-key pairs) * Hq, for every
row. It first checks the kernel against the float32 reference on a small shape.

    python benchmarks/prefill_attention.py [--formats ...] [--implementations ...] [--variants "block_k=64;..."]
    (a variant's rotated=1 times Hadamard-rotated keys; keep_first=N,keep_recent=M a layer
    keeping those positions in full precision, as `fp4kv_jax.cache.kept_values` gives them)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

from common import formats_arg, median_ms, realistic_kv, run_header, variants_arg
from fp4kv_jax import quantize
from fp4kv_jax.cache import LayerCache
from fp4kv_jax.kernels.prefill_attention import pallas_mosaic, prefill_attention

HEADS, KV_HEADS = 64, 8
WORKLOADS = {"prompt": (0, 8192), "chunk": (32768, 2048)}  # (prefix, chunk)


def causal_pairs(prefix: int, chunk: int) -> int:
    return chunk * prefix + chunk * (chunk + 1) // 2


def handles(implementation: str, fmt: str) -> bool:
    return implementation != "pallas_mosaic" or fmt in pallas_mosaic.SUPPORTED_FORMATS


def check_correctness(formats, implementations) -> list[dict]:
    """Kernels vs reference: 2 sequences, prefixes 0 and 300, a 200-token chunk, GQA 8."""
    rows = []
    k, v = realistic_kv(jax.random.key(0), 2, 2, 512, 128)
    q = jax.random.normal(jax.random.key(1), (2, 200, 16, 128), jnp.bfloat16)
    start = jnp.array([0, 300], jnp.int32)
    for fmt in formats:
        layer = LayerCache(k=quantize(k, fmt), v=quantize(v, fmt), window=None, ring=False)
        ref = prefill_attention(q, layer, start, implementation="reference").astype(jnp.float32)
        for implementation in (i for i in implementations if handles(i, fmt)):
            out = prefill_attention(q, layer, start, implementation=implementation).astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            rows.append(dict(fmt=fmt, impl=implementation, rel_err=err, finite=bool(jnp.all(jnp.isfinite(out)))))
    return rows


def time_workload(name, head_dim, formats, implementations, variants) -> list[dict]:
    prefix, chunk = WORKLOADS[name]
    total = prefix + chunk
    k, v = realistic_kv(jax.random.key(2), 1, KV_HEADS, total, head_dim)
    q = jax.random.normal(jax.random.key(3), (1, chunk, HEADS, head_dim), jnp.bfloat16)
    flops = 4 * head_dim * causal_pairs(prefix, chunk) * HEADS
    shape = dict(workload=name, prefix=prefix, chunk=chunk, head_dim=head_dim)

    k_bthd = k.transpose(0, 2, 1, 3).astype(jnp.bfloat16)
    v_bthd = v.transpose(0, 2, 1, 3).astype(jnp.bfloat16)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=prefix == 0, implementation="cudnn"))
    cudnn_ms = median_ms(cudnn, q, k_bthd, v_bthd, repeats=10, calls=3)
    rows = [dict(shape, impl="cudnn", fmt="bf16", variant={}, ms=cudnn_ms)]
    del k_bthd, v_bthd

    start = jnp.array([prefix], jnp.int32)
    for fmt in formats:
        layer = LayerCache(k=quantize(k, fmt), v=quantize(v, fmt), window=None, ring=False)
        for implementation, variant in ((i, v) for i in implementations if handles(i, fmt) for v in variants):
            # `rotated=1` times a layer whose keys are stored Hadamard-rotated: the op
            # then rotates the queries too (the same kernel otherwise).
            layer_options = ("rotated", "keep_first", "keep_recent")
            tuning = {key: value for key, value in variant.items() if key not in layer_options}
            timed = dataclasses.replace(layer, keys_rotated=bool(variant.get("rotated", 0)))
            first, recent = variant.get("keep_first", 0), variant.get("keep_recent", 0)
            kept = {}
            if first + recent:
                copies = jnp.zeros((1, KV_HEADS, first + recent, head_dim), jnp.bfloat16)  # decode's; unread here
                timed = dataclasses.replace(timed, kept_k=copies, kept_v=copies, keep_first=first, keep_recent=recent)
                kept = dict(full_k=k, full_v=v)  # by position, as cache.kept_values gives them
            fused = jax.jit(lambda q, layer, start, kept, implementation=implementation, tuning=tuning: prefill_attention(
                q, layer, start, implementation=implementation, **kept, **tuning))
            try:
                ms = median_ms(fused, q, timed, start, kept, repeats=10, calls=3)
            except Exception as error:  # a variant that does not compile or apply is reported, not fatal
                print(f"{name} D={head_dim} {fmt} {implementation} {variant}: {type(error).__name__}: "
                      f"{str(error)[:300]}", file=sys.stderr)
                continue
            rows.append(dict(shape, impl=implementation, fmt=fmt, variant=variant, ms=ms))
        del layer
    for row in rows:
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        row["vs_cudnn"] = cudnn_ms / row["ms"]
    return rows


def table(rows) -> str:
    lines = [
        "| workload | prefix | chunk | D | impl | cache | variant | ms | TFLOP/s | vs cuDNN bf16 |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        variant = ",".join(f"{k}={v}" for k, v in r["variant"].items()) or "-"
        lines.append(
            f"| {r['workload']} | {r['prefix']} | {r['chunk']} | {r['head_dim']} | {r['impl']} | "
            f"{r['fmt']} | {variant} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['vs_cudnn']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="bf16,fp8_e4m3,fp4_e2m1,nvfp4,mxfp4")
    parser.add_argument("--implementations", default="pallas_triton,pallas_mosaic")
    parser.add_argument("--variants", default="", help="';'-separated k=v,k=v tuning sets ('' the defaults)")
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"any of {', '.join(WORKLOADS)}")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("prefill_attention.py: needs a GPU.", file=sys.stderr)
        return 2
    formats = formats_arg(parser, args.formats)
    variants = variants_arg(args.variants)
    print(run_header())
    implementations = args.implementations.split(",")
    checks = check_correctness(formats, implementations)
    for c in checks:
        print(f"check {c['fmt']:12s} {c['impl']:13s}: rel_err={c['rel_err']:.2e} finite={c['finite']}")
    rows = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for name in args.workloads.split(","):
            shape_rows = time_workload(name, head_dim, formats, implementations, variants)
            print(table(shape_rows), flush=True)
            rows += shape_rows
    print("\n" + table(rows))
    bad = [c for c in checks if not c["finite"] or c["rel_err"] > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
