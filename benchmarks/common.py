"""Timing and input helpers shared by the GPU benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_ms(fn, *args, repeats: int = 30, calls: int = 10) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls, in ms."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def copy_bandwidth_tbs(nbytes: int = 2 << 30) -> float:
    """The device's copy bandwidth in TB/s, counting bytes read plus written."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0000001)
    ms = median_ms(copy, x, repeats=10, calls=5)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def realistic_kv(key, batch, kv_heads, context, head_dim):
    """K with a few outlier channels and RoPE-like rotation, V plain; [B, Hkv, S, D] f32."""
    k_key, v_key, c_key = jax.random.split(key, 3)
    k = jax.random.normal(k_key, (batch, kv_heads, context, head_dim), jnp.float32)
    outliers = jax.random.choice(c_key, head_dim, (4,), replace=False)
    k = k.at[..., outliers].multiply(8.0)
    half = head_dim // 2
    theta = jnp.arange(context)[:, None] / 10000.0 ** (jnp.arange(half) / half)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    k1, k2 = k[..., :half], k[..., half:]
    k = jnp.concatenate([k1 * cos - k2 * sin, k1 * sin + k2 * cos], axis=-1)
    v = jax.random.normal(v_key, (batch, kv_heads, context, head_dim), jnp.float32)
    return k, v


def formats_arg(parser, text: str) -> list[str]:
    """The cache formats named by a comma-separated --formats; argparse error if unknown."""
    from fp4kv_jax import format_names

    formats = text.split(",")
    unknown = set(formats) - set(format_names())
    if unknown:
        parser.error(f"--formats: unknown {sorted(unknown)}; valid: {', '.join(format_names())}")
    return formats


def variants_arg(text: str) -> list[dict[str, int]]:
    """--variants "k=v,k=v;k=v" -> one dict of int tuning values per ';'-separated set;
    an empty set is the implementation's defaults."""
    return [
        {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
        for spec in text.split(";")
    ]


def run_header() -> str:
    """The line every benchmark prints first: the card, the JAX version, the UTC time."""
    return (
        f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
