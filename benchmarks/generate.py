"""Decode throughput and capacity per cache dtype, on random-weight models of real widths.

For each model, cache dtype and (batch, context) it fills the cache with random K/V
(quantized on write, lengths set to context - steps; prefill is not timed here), then
times the jitted decode loop of `fp4kv_jax.generate` for `--steps` tokens, and times
the attention of one decode step alone (all layers' `decode_attention` calls) to split
a step into attention and the rest. It also reports, per dtype, the largest context
that fits a memory budget (from the planner, confirmed by allocating that cache).
Speed is reported as a ratio to the bf16 cache measured in the same run.

    python benchmarks/generate.py                       # GPU: the default sweep
    python benchmarks/generate.py --smoke               # CPU: a tiny run of the same code
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from common import run_header
from fp4kv_jax import cache as kv_cache
from fp4kv_jax.generate import _decode_loop
from fp4kv_jax.kernels.decode_attention import decode_attention
from fp4kv_jax.memory import max_cache_tokens
from fp4kv_jax.models.configs import ModelConfig, get_config
from fp4kv_jax.models.loading import build_model

# Real layer widths with fewer layers, so each fits one GPU with a long cache.
MODELS = {
    "qwen3-4b-like-8l": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_layers=8, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
        qk_norm=True, max_position_embeddings=131072,
    ),
    # gpt-oss-20b's attention and widths; 4 experts (top-2) instead of 32 (top-4),
    # because this model runs every expert densely.
    "gpt-oss-20b-like-8l": dataclasses.replace(
        get_config("gpt-oss-20b"), num_layers=8,
        layer_types=get_config("gpt-oss-20b").layer_types[:8], num_experts=4,
        experts_per_token=2,
    ),
}
SMOKE_MODEL = ModelConfig(
    architecture="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True,
)


def random_model(config: ModelConfig, dtype):
    model = build_model(config, dtype)
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [(jax.random.normal(k, x.shape, jnp.float32) * 0.02).astype(x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def filled_cache(config, batch, context, fmt, filled):
    """A cache of max_len `context` whose first `filled` positions hold random K/V."""
    cache = kv_cache.init_cache(config, batch, context, fmt)
    chunk = min(filled, 4096)
    key = jax.random.key(1)
    write = jax.jit(
        lambda c, k, v: kv_cache.update(c, [k] * config.num_layers, [v] * config.num_layers),
        donate_argnums=0,
    )
    for start in range(0, filled, chunk):
        n = min(chunk, filled - start)
        key, kk, vk = jax.random.split(key, 3)
        shape = (batch, n, config.num_kv_heads, config.head_dim)
        cache = write(cache, jax.random.normal(kk, shape, jnp.bfloat16), jax.random.normal(vk, shape, jnp.bfloat16))
    return cache


def median_seconds(fn, repeats):
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(model, batch, context, fmt, steps, repeats):
    config = model.config
    graphdef, state = nnx.split(model)
    logits = jnp.zeros((batch, config.vocab_size), jnp.float32)

    def decode():
        cache = filled_cache(config, batch, context, fmt, context - steps)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        out = _decode_loop(
            graphdef, state, cache, logits, jax.random.key(0), max_new_tokens=steps,
            temperature=0.0, top_k=None, top_p=None, end_ids=(-2,), on_token=None,
        )
        jax.block_until_ready(out)
        return time.perf_counter() - start

    decode()  # compile
    step_seconds = statistics.median(decode() for _ in range(repeats)) / steps
    cache = filled_cache(config, batch, context, fmt, context - 1)
    q = jax.random.normal(jax.random.key(2), (batch, config.num_heads, config.head_dim), jnp.bfloat16)
    attend = jax.jit(lambda c, q: [decode_attention(q, layer, c.lengths) for layer in c.layers])
    jax.block_until_ready(attend(cache, q))
    attention_seconds = median_seconds(lambda: attend(cache, q), repeats)
    return dict(
        batch=batch, context=context, fmt=fmt, tokens_per_second=batch / step_seconds,
        step_ms=step_seconds * 1e3, attention_ms=attention_seconds * 1e3,
        cache_bytes=cache.nbytes,
    )


def capacity(config, formats, budget_gib, batch, allocate):
    rows = []
    for fmt in formats:
        tokens = max_cache_tokens(config, fmt, int(budget_gib * 2**30), batch_size=batch)
        allocated = None
        if allocate and tokens:
            cache = kv_cache.init_cache(config, batch, tokens, fmt)
            allocated = cache.nbytes
            del cache
        rows.append(dict(fmt=fmt, batch=batch, max_context=tokens, allocated_bytes=allocated))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code")
    parser.add_argument("--formats", default="bf16,fp8_e4m3,fp4_e2m1,nvfp4")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gib", type=float, default=40.0)
    parser.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    args = parser.parse_args()
    formats = args.formats.split(",")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; valid: {', '.join(MODELS)}")
    if args.smoke:
        models = {"smoke": SMOKE_MODEL}
        shapes = [(2, 64)]
        args.steps, args.repeats, args.budget_gib = 4, 1, 0.001
    else:
        if jax.default_backend() != "gpu":
            print("generate.py: needs a GPU (or pass --smoke).", file=sys.stderr)
            return 2
        models = {name: MODELS[name] for name in args.models.split(",")}
        shapes = [(64, 16384), (32, 32768), (8, 131072)]
    print(run_header())
    for name, config in models.items():
        model = random_model(config, jnp.bfloat16)
        print(f"\n## {name}: {config.num_layers} layers, {config.num_heads}/{config.num_kv_heads} heads, "
              f"head_dim {config.head_dim}, hidden {config.hidden_size}")
        print("| B | context | cache | tokens/s | vs bf16 | step ms | attention ms | rest ms | cache GB |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for batch, context in shapes:
            base = None
            for fmt in formats:
                try:
                    r = measure(model, batch, context, fmt, args.steps, args.repeats)
                except Exception as error:  # out of memory at this shape: report, go on
                    print(f"| {batch} | {context} | {fmt} | {type(error).__name__} | | | | | |")
                    continue
                base = r["tokens_per_second"] if fmt == "bf16" else base
                ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
                print(f"| {batch} | {context} | {fmt} | {r['tokens_per_second']:.0f} | {ratio} | "
                      f"{r['step_ms']:.2f} | {r['attention_ms']:.2f} | "
                      f"{r['step_ms'] - r['attention_ms']:.2f} | {r['cache_bytes'] / 1e9:.2f} |", flush=True)
        capacity_batch = shapes[0][0]
        print(f"\nCapacity in {args.budget_gib:g} GiB at batch {capacity_batch} (planner; allocated to confirm):")
        for row in capacity(config, formats, args.budget_gib, capacity_batch, allocate=True):
            print(f"- {row['fmt']}: max context {row['max_context']:,}, allocated {row['allocated_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
