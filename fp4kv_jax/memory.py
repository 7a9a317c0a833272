"""Memory planning for KV caches, counting block-scale buffers and trimmed windows.

The figures equal the `nbytes` of the cache that `init_cache` builds with the same
arguments, to the byte.
"""

from __future__ import annotations

from collections.abc import Sequence

from fp4kv_jax import key_rounding
from fp4kv_jax.cache import check_kept_dtype, tensor_formats
from fp4kv_jax.formats import get_codec
from fp4kv_jax.models.configs import ModelConfig, get_config

_LENGTH_BYTES = 4  # int32 length per sequence
_FLAG_BYTES = 2  # the overflowed and nonfinite bools
_GLOBAL_SCALE_BYTES = 4  # float32, for each K or V tensor whose format has one
_FACTOR_ELEMENT_BYTES = 4  # float32 query-aware key-rounding factors


def _layer_formats(config: ModelConfig, cache_dtype, key_dtype, value_dtype, bf16_layers):
    """(key format, value format) of each layer, as `init_cache` builds them."""
    return zip(*tensor_formats(cache_dtype, config.num_layers, key_dtype, value_dtype, bf16_layers))


def _tensor_bytes_per_position(config: ModelConfig, fmt: str) -> int:
    """K or V of one position in one layer: data and block scales."""
    codec = get_codec(fmt, arg="cache_dtype")
    return config.num_kv_heads * codec.bytes_per_vector(config.head_dim)


def kv_cache_bytes_per_token(
    config: ModelConfig | str,
    cache_dtype: str | Sequence[str],
    *,
    key_dtype: str | None = None,
    value_dtype: str | None = None,
    bf16_layers: Sequence[int] = (),
    keep_first: int = 0,
    keep_recent: int = 0,
    kept_dtype: str = "bf16",
    center_keys: bool = False,
    center_values: bool = False,
    round_keys: bool = False,
) -> int:
    """Bytes that one more token of one sequence costs across all layers.

    Equals 2 * layers * kv_heads * head_dim * bits / 8 with the block scales counted in
    the bits. Sliding layers count too: this is the cache without trimmed windows.
    key_dtype, value_dtype and bf16_layers are `init_cache`'s; keep_first,
    keep_recent, kept_dtype, center_keys and center_values cost a fixed
    `fixed_bytes_per_sequence`, not a per-token amount; round_keys a fixed amount per
    cache (`kv_cache_bytes`).
    """
    del keep_first, keep_recent, kept_dtype, center_keys, center_values, round_keys
    config = get_config(config)
    return sum(
        _tensor_bytes_per_position(config, k) + _tensor_bytes_per_position(config, v)
        for k, v in _layer_formats(config, cache_dtype, key_dtype, value_dtype, bf16_layers)
    )


def fixed_bytes_per_sequence(
    config: ModelConfig | str,
    keep_first: int = 0,
    keep_recent: int = 0,
    kept_dtype: str = "bf16",
    center_keys: bool = False,
    center_values: bool = False,
) -> int:
    """What one sequence costs over all layers whatever its length: the copies of its
    first and last positions (`init_cache`'s keep_first, keep_recent, kept_dtype) and
    the float32 mean key and value of centered keys and values (center_keys,
    center_values)."""
    config = get_config(config)
    kept_bytes = check_kept_dtype(kept_dtype).itemsize
    per_layer = 2 * config.num_kv_heads * (keep_first + keep_recent) * config.head_dim * kept_bytes
    per_layer += (center_keys + center_values) * config.num_kv_heads * config.head_dim * 4
    return config.num_layers * per_layer


def kv_cache_bytes(
    config: ModelConfig | str,
    cache_dtype: str | Sequence[str],
    batch_size: int,
    max_len: int,
    *,
    trim_sliding_layers: bool = False,
    key_dtype: str | None = None,
    value_dtype: str | None = None,
    bf16_layers: Sequence[int] = (),
    keep_first: int = 0,
    keep_recent: int = 0,
    kept_dtype: str = "bf16",
    center_keys: bool = False,
    center_values: bool = False,
    round_keys: bool = False,
) -> int:
    """The exact bytes of `init_cache(config, batch_size, max_len, cache_dtype, ...)`;
    round_keys: the cache was built with query_moments, so each layer with packed FP4
    keys holds a float32 [Hkv, D, D] rounding factor, whatever the batch and length."""
    config = get_config(config)
    total = batch_size * _LENGTH_BYTES + _FLAG_BYTES
    total += batch_size * fixed_bytes_per_sequence(
        config, keep_first, keep_recent, kept_dtype, center_keys, center_values
    )
    layer_formats = _layer_formats(config, cache_dtype, key_dtype, value_dtype, bf16_layers)
    for layer, formats in enumerate(layer_formats):
        window = config.layer_window(layer)
        capacity = min(window, max_len) if trim_sliding_layers and window else max_len
        for fmt in formats:
            total += batch_size * capacity * _tensor_bytes_per_position(config, fmt)
            if get_codec(fmt).has_global_scale:
                total += _GLOBAL_SCALE_BYTES
        if round_keys and key_rounding.rounds(formats[0]):
            total += config.num_kv_heads * config.head_dim**2 * _FACTOR_ELEMENT_BYTES
    return total


def max_cache_tokens(
    config: ModelConfig | str,
    cache_dtype: str | Sequence[str],
    budget_bytes: int,
    *,
    batch_size: int = 1,
    trim_sliding_layers: bool = False,
    key_dtype: str | None = None,
    value_dtype: str | None = None,
    bf16_layers: Sequence[int] = (),
    keep_first: int = 0,
    keep_recent: int = 0,
    kept_dtype: str = "bf16",
    center_keys: bool = False,
    center_values: bool = False,
    round_keys: bool = False,
) -> int:
    """The largest max_len whose cache of `batch_size` sequences fits `budget_bytes`.

    Returns 0 when not even one position fits.
    """
    config = get_config(config)

    def fits(n: int) -> bool:
        return (
            kv_cache_bytes(
                config, cache_dtype, batch_size, n, trim_sliding_layers=trim_sliding_layers,
                key_dtype=key_dtype, value_dtype=value_dtype, bf16_layers=bf16_layers,
                keep_first=keep_first, keep_recent=keep_recent, kept_dtype=kept_dtype,
                center_keys=center_keys, center_values=center_values, round_keys=round_keys,
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
