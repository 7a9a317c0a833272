"""Memory planning for KV caches, counting block-scale buffers and trimmed windows.

The figures equal the `nbytes` of the cache that `init_cache` builds with the same
arguments, to the byte.
"""

from __future__ import annotations

from collections.abc import Sequence

from fp4kv_jax.formats import get_codec
from fp4kv_jax.models.configs import ModelConfig, get_config

_LENGTH_BYTES = 4  # int32 length per sequence
_FLAG_BYTES = 2  # the overflowed and nonfinite bools
_GLOBAL_SCALE_BYTES = 4  # float32, for K and for V of each layer that has one


def _formats(config: ModelConfig, cache_dtype: str | Sequence[str]) -> tuple[str, ...]:
    formats = (cache_dtype,) * config.num_layers if isinstance(cache_dtype, str) else tuple(cache_dtype)
    if len(formats) != config.num_layers:
        raise ValueError(
            f"cache_dtype: a per-layer list needs {config.num_layers} entries, got {len(formats)}."
        )
    return formats


def _layer_bytes_per_position(config: ModelConfig, fmt: str) -> int:
    """K plus V of one position in one layer: data and block scales."""
    codec = get_codec(fmt, arg="cache_dtype")
    return 2 * config.num_kv_heads * codec.bytes_per_vector(config.head_dim)


def kv_cache_bytes_per_token(
    config: ModelConfig | str, cache_dtype: str | Sequence[str]
) -> int:
    """Bytes that one more token of one sequence costs across all layers.

    Equals 2 * layers * kv_heads * head_dim * bits / 8 with the block scales counted in
    the bits. Sliding layers count too: this is the cache without trimmed windows.
    """
    config = get_config(config)
    return sum(_layer_bytes_per_position(config, f) for f in _formats(config, cache_dtype))


def kv_cache_bytes(
    config: ModelConfig | str,
    cache_dtype: str | Sequence[str],
    batch_size: int,
    max_len: int,
    *,
    trim_sliding_layers: bool = False,
) -> int:
    """The exact bytes of `init_cache(config, batch_size, max_len, cache_dtype, ...)`."""
    config = get_config(config)
    total = batch_size * _LENGTH_BYTES + _FLAG_BYTES
    for layer, fmt in enumerate(_formats(config, cache_dtype)):
        window = config.layer_window(layer)
        capacity = min(window, max_len) if trim_sliding_layers and window else max_len
        total += batch_size * capacity * _layer_bytes_per_position(config, fmt)
        if get_codec(fmt).has_global_scale:
            total += 2 * _GLOBAL_SCALE_BYTES
    return total


def max_cache_tokens(
    config: ModelConfig | str,
    cache_dtype: str | Sequence[str],
    budget_bytes: int,
    *,
    batch_size: int = 1,
    trim_sliding_layers: bool = False,
) -> int:
    """The largest max_len whose cache of `batch_size` sequences fits `budget_bytes`.

    Returns 0 when not even one position fits.
    """
    config = get_config(config)

    def fits(n: int) -> bool:
        return (
            kv_cache_bytes(
                config, cache_dtype, batch_size, n, trim_sliding_layers=trim_sliding_layers
            )
            <= budget_bytes
        )

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
