"""A functional KV cache for a whole model: per layer K and V in any cache format.

Physical layout, chosen for the attention kernels: each layer holds K and V as
`QuantizedTensor`s with head-major storage,

  data    [B, Hkv, capacity, D // elements_per_datum]   (uint8 packed E2M1 for FP4)
  scales  [B, Hkv, capacity, D // block_size]           (FP4 formats only)
  global_scale []  float32                              (fp8, nvfp4)

so one (sequence, kv-head) pair streams contiguous rows of packed bytes and scales
over positions. `capacity` is `max_len`, or the sliding window for sliding layers of a
cache built with `trim_sliding_layers=True`; those layers are ring buffers in which
position p lives in slot p % window.

Writes quantize straight into the stored rows (`quantize_into_cache`: a Pallas kernel
on GPU, a scatter elsewhere), so a cache passed to a jitted step with `donate_argnums`
is updated in place. A model writes each layer with `write_layer` and then moves the
lengths on once with `advance`; `update` does both.

Overfull caches are refused: a chunk longer than the capacity fails at trace time;
when only the runtime lengths overflow, the rows past `max_len` are dropped, the
sticky flag `overflowed` is set, and `check_cache` (or eager use) raises. Non-finite
K/V set the sticky flag `nonfinite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fp4kv_jax import channel_keys, key_rounding
from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels.quantize_into_cache import quantize_into_cache, token_slots, write_rows
from fp4kv_jax.models.configs import ModelConfig, get_config
from fp4kv_jax.rotation import hadamard_matrix, hadamard_rotate

# The formats the kept copies (`LayerCache.kept_k`) may be stored in, without a scale:
# bf16, or fp8 e4m3 at half the bytes a position (SmolLM2's keys and values in a
# centered, rotated frame stay far inside its range; finite values past it saturate).
KEPT_DTYPES = ("bf16", "fp8_e4m3")


class CacheOverflowError(ValueError):
    """A write would go past the cache's max_len."""


class NonFiniteKVError(ValueError):
    """NaN or infinite keys or values were written to the cache."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """K and V of one layer, each logically [B, Hkv, capacity, D].

    Attributes:
      k, v: the stored keys and values.
      window: the layer's attention window in positions, or None for full attention.
      ring: whether capacity == window and position p is stored in slot p % window.
      keys_rotated: whether keys are stored rotated by the Hadamard matrix along
        head_dim (`fp4kv_jax.rotation`); attention then rotates its queries the same way.
      values_rotated: whether values are stored rotated so; attention then rotates its
        output back (softmax weights times V H, times H, is the plain output).
      kept_k, kept_v: bf16 (or fp8 e4m3, `KEPT_DTYPES`) [B, Hkv, keep_first +
        keep_recent, D] full-precision copies (rotated like k and v) of the first
        `keep_first` positions, in slots 0.., and of the last `keep_recent` written,
        in a ring (position p in slot keep_first + p % keep_recent); None when the
        layer keeps none. A query at position i reads position p from them when
        p < keep_first or p > i - keep_recent (KIVI's full-precision sink and recent
        window), else from k, v.
      keys_per_channel: whether k's block scales run over blocks of positions, one per
        channel (`fp4kv_jax.channel_keys`); a block is quantized once its last
        position is written, and until then its positions are read from the kept ring.
      key_mean: float32 [B, Hkv, D] or None: each sequence's keys are stored minus
        this mean of the first chunk written to it (centered keys). Every score of a
        query then moves by the same q . mean, which softmax attention without sinks
        ignores, while the quantized keys lose their common offset.
      value_mean: the same for values (centered values); attention adds it back to
        its output, exactly when the weights sum to 1 (no sinks).
      key_rounding: float32 [Hkv, D, D] or None: the factor that query-aware key
        rounding (`fp4kv_jax.key_rounding`) rounds this layer's keys against, from
        calibrated query moments; None for nearest rounding.
    """

    k: QuantizedTensor
    v: QuantizedTensor
    window: int | None = dataclasses.field(metadata=dict(static=True))
    ring: bool = dataclasses.field(metadata=dict(static=True))
    keys_rotated: bool = dataclasses.field(default=False, metadata=dict(static=True))
    values_rotated: bool = dataclasses.field(default=False, metadata=dict(static=True))
    kept_k: jax.Array | None = None
    kept_v: jax.Array | None = None
    keep_first: int = dataclasses.field(default=0, metadata=dict(static=True))
    keep_recent: int = dataclasses.field(default=0, metadata=dict(static=True))
    keys_per_channel: bool = dataclasses.field(default=False, metadata=dict(static=True))
    key_mean: jax.Array | None = None
    value_mean: jax.Array | None = None
    key_rounding: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.data.shape[2]

    @property
    def keeps_positions(self) -> bool:
        """Whether some positions are read from full-precision copies (`kept_k`)."""
        return self.keep_first + self.keep_recent > 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The cache of a whole model.

    Attributes:
      layers: one LayerCache per layer.
      lengths: int32 [B], tokens held per sequence.
      overflowed: bool [], set once any write went past max_len.
      nonfinite: bool [], set once any written key or value was NaN or infinite.
      max_len: positions each sequence can hold (static).
    """

    layers: tuple[LayerCache, ...]
    lengths: jax.Array
    overflowed: jax.Array
    nonfinite: jax.Array
    max_len: int = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))


def tensor_formats(
    cache_dtype: str | Sequence[str],
    num_layers: int,
    key_dtype: str | None = None,
    value_dtype: str | None = None,
    bf16_layers: Sequence[int] = (),
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(key formats, value formats), one per layer, from `init_cache`'s arguments."""
    formats = _layer_formats(cache_dtype, num_layers)
    for name, override in (("key_dtype", key_dtype), ("value_dtype", value_dtype)):
        if override is not None:
            get_codec(override, arg=name)
    outside = [layer for layer in bf16_layers if not 0 <= layer < num_layers]
    if outside:
        raise ValueError(f"bf16_layers: {outside} are not layers of a {num_layers}-layer model.")

    def per_layer(override):
        return tuple(
            "bf16" if layer in bf16_layers else (override or fmt) for layer, fmt in enumerate(formats)
        )

    return per_layer(key_dtype), per_layer(value_dtype)


def _layer_formats(cache_dtype: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    if isinstance(cache_dtype, str):
        formats = (cache_dtype,) * num_layers
    else:
        formats = tuple(cache_dtype)
        if len(formats) != num_layers:
            raise ValueError(
                f"cache_dtype: a per-layer list needs {num_layers} entries, got {len(formats)}."
            )
    for fmt in formats:
        get_codec(fmt, arg="cache_dtype")
    return formats


def empty_tensor(fmt: str, shape: tuple[int, ...]) -> QuantizedTensor:
    """A zero-filled tensor of logical `shape` [..., D] in format `fmt`."""
    codec = get_codec(fmt)
    *lead, d = shape
    data = jnp.zeros((*lead, d // codec.elements_per_datum), codec.data_dtype)
    scales = None
    if codec.block_size is not None:
        scales = jnp.zeros((*lead, d // codec.block_size), codec.scale_dtype)
    return QuantizedTensor(data, scales, codec.initial_global_scale(), fmt)


def init_cache(
    config: ModelConfig | str,
    batch_size: int,
    max_len: int,
    cache_dtype: str | Sequence[str] = "bf16",
    *,
    trim_sliding_layers: bool = False,
    rotate_keys: bool = False,
    rotate_values: bool = False,
    key_dtype: str | None = None,
    value_dtype: str | None = None,
    bf16_layers: Sequence[int] = (),
    keep_first: int = 0,
    keep_recent: int = 0,
    kept_dtype: str = "bf16",
    per_channel_keys: bool = False,
    center_keys: bool = False,
    center_values: bool = False,
    query_moments: np.ndarray | None = None,
) -> KVCache:
    """An empty cache for `config` (a ModelConfig, built-in id or HF directory).

    Args:
      batch_size: sequences held.
      max_len: positions per sequence.
      cache_dtype: one format name for every layer, or one per layer.
      key_dtype, value_dtype: store every layer's keys (values) in this format
        instead of cache_dtype, for ablations of K against V (the Pallas attention
        kernels need K and V in one format; attention falls back to the reference).
      bf16_layers: indices of layers whose keys and values are stored in bf16
        whatever the other arguments say (a per-layer dtype recipe).
      trim_sliding_layers: sliding-window layers keep only their last `sliding_window`
        positions, in a ring buffer.
      rotate_keys: store keys rotated by the Hadamard matrix along head_dim (an
        accuracy recipe for block formats; exact in attention). head_dim must be a
        power of two.
      rotate_values: store values rotated the same way (likewise exact).
      keep_first, keep_recent: every layer also keeps copies (in kept_dtype) of the first
        `keep_first` positions and of the last `keep_recent` ones, which attention reads
        instead of the stored formats (`LayerCache.kept_k`): KIVI's full-precision
        sinks and recent window.
      kept_dtype: what the kept copies are stored as, one of KEPT_DTYPES: "bf16", or
        "fp8_e4m3" (half the bytes, so twice the positions at one budget).
      per_channel_keys: quantize keys per channel over blocks of positions (KIVI,
        KVQuant; `fp4kv_jax.channel_keys`), for packed FP4 key formats; the recent
        window stages a block until it fills, so keep_recent must be at least the
        format's block size.
      center_keys, center_values: store each sequence's keys (values) minus the mean
        key (value) of the first chunk written to it (`LayerCache.key_mean`,
        `value_mean`): exact in attention without sinks. Kept positions hold them
        centered too. Not combined with per_channel_keys.
      query_moments: float32 [layers, Hkv, D, D], the queries' second moments from
        `fp4kv_jax.key_rounding.query_moments` on a calibration text: every layer whose
        keys are packed FP4 then rounds them query-aware (`LayerCache.key_rounding`).
        Not combined with per_channel_keys.
    """
    config = get_config(config)
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}.")
    for name, value in (("keep_first", keep_first), ("keep_recent", keep_recent)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}.")
    kept = keep_first + keep_recent
    if per_channel_keys and kept_dtype != "bf16":
        raise ValueError(
            "kept_dtype: per_channel_keys quantizes its key blocks from the kept ring as bf16 copies; "
            "use kept_dtype='bf16'."
        )
    kept_dtype = check_kept_dtype(kept_dtype)
    key_formats, value_formats = tensor_formats(
        cache_dtype, config.num_layers, key_dtype, value_dtype, bf16_layers
    )
    if rotate_keys or rotate_values:
        hadamard_matrix(config.head_dim)  # refuses a head_dim that is not a power of two
    if (center_keys or center_values) and per_channel_keys:
        raise ValueError(
            "center_keys, center_values: not combined with per_channel_keys, whose key "
            "blocks are quantized from the recent window's copies."
        )
    factors = _rounding_factors(config, key_formats, query_moments, rotate_keys, per_channel_keys)
    layers = []
    for layer, (key_fmt, value_fmt) in enumerate(zip(key_formats, value_formats)):
        for fmt in (key_fmt, value_fmt):
            get_codec(fmt).check_last_dim(config.head_dim, arg="head_dim")
        window = config.layer_window(layer)
        ring = trim_sliding_layers and window is not None and window < max_len
        capacity = window if ring else max_len
        if ring and kept:
            raise ValueError(
                "keep_first, keep_recent: full-precision positions are not kept in trimmed "
                "sliding-window (ring-buffer) layers; build the cache without trim_sliding_layers."
            )
        if per_channel_keys:
            block = channel_keys.check_format(key_fmt, arg="per_channel_keys")
            if keep_recent < block:
                raise ValueError(
                    f"per_channel_keys: needs keep_recent >= {block}, the {key_fmt} block of positions "
                    f"the recent window stages until it fills; got keep_recent={keep_recent}."
                )
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        kept_shape = (batch_size, config.num_kv_heads, kept, config.head_dim)
        kept_k, kept_v = (jnp.zeros(kept_shape, kept_dtype) for _ in range(2)) if kept else (None, None)
        mean = lambda centered: (
            jnp.zeros((batch_size, config.num_kv_heads, config.head_dim), jnp.float32) if centered else None
        )
        layers.append(
            LayerCache(
                empty_tensor(key_fmt, shape), empty_tensor(value_fmt, shape), window, ring,
                rotate_keys, rotate_values, kept_k, kept_v, keep_first, keep_recent, per_channel_keys,
                mean(center_keys), mean(center_values), factors[layer],
            )
        )
    return KVCache(
        layers=tuple(layers),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        overflowed=jnp.zeros((), bool),
        nonfinite=jnp.zeros((), bool),
        max_len=max_len,
    )


def _rounding_factors(config, key_formats, query_moments, rotated: bool, per_channel_keys: bool) -> list:
    """Each layer's `LayerCache.key_rounding`: None everywhere without query_moments,
    else the factor for every layer whose keys are packed FP4."""
    if query_moments is None:
        return [None] * config.num_layers
    moments = np.asarray(query_moments)
    expected = (config.num_layers, config.num_kv_heads, config.head_dim, config.head_dim)
    if moments.shape != expected or not np.all(np.isfinite(moments)):
        raise ValueError(
            f"query_moments: expected finite float [layers, kv_heads, head_dim, head_dim] = {expected}, "
            f"got shape {moments.shape}{'' if moments.shape != expected else ' with non-finite entries'}."
        )
    if per_channel_keys:
        raise ValueError("query_moments: query-aware rounding is not combined with per_channel_keys.")
    rounded = [key_rounding.rounds(fmt) for fmt in key_formats]
    if not any(rounded):
        raise ValueError(
            f"query_moments: query-aware rounding needs packed FP4 keys; the keys are stored as "
            f"{sorted(set(key_formats))}."
        )
    return [
        key_rounding.rounding_factor(moments[layer], rotated=rotated) if rounds else None
        for layer, rounds in enumerate(rounded)
    ]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _token_counts(cache: KVCache, num_tokens, chunk: int) -> jax.Array:
    if num_tokens is None:
        return jnp.full((cache.batch_size,), chunk, jnp.int32)
    counts = jnp.broadcast_to(jnp.asarray(num_tokens, jnp.int32), (cache.batch_size,))
    if _is_concrete(counts) and bool(jnp.any((counts < 0) | (counts > chunk))):
        raise ValueError(f"num_tokens: each entry must lie in [0, {chunk}], got {counts}.")
    return counts


def _overflow_message(cache: KVCache, counts) -> str:
    return (
        f"cache overflow: writing {counts} tokens at lengths {cache.lengths} would pass "
        f"max_len={cache.max_len}. Build the cache with a larger max_len."
    )


def write_layer(
    cache: KVCache,
    layer: int,
    k: jax.Array,
    v: jax.Array,
    num_tokens: jax.Array | int | None = None,
) -> KVCache:
    """Writes a chunk of keys and values for one layer at each sequence's length.

    Does not move the lengths on; call `advance` once after every layer is written.

    Args:
      layer: the layer index.
      k, v: float [B, T, Hkv, D], token-major as attention computes them.
      num_tokens: int or int32 [B], the leading tokens of the chunk that are real for
        each sequence (a ragged prefill); the rest are not written. Default: all T.
    """
    lc = cache.layers[layer]
    expected = (cache.batch_size, None, lc.k.shape[1], lc.k.shape[3])
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 or any(e is not None and e != s for e, s in zip(expected, x.shape)):
            raise ValueError(
                f"{name}: expected shape [batch={expected[0]}, T, kv_heads={expected[2]}, "
                f"head_dim={expected[3]}], got {tuple(x.shape)}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}.")
    if k.shape != v.shape:
        raise ValueError(f"k, v: shapes differ, {k.shape} and {v.shape}.")
    chunk = k.shape[1]
    if not lc.ring and chunk > lc.capacity:
        raise CacheOverflowError(
            f"k: a chunk of {chunk} tokens cannot fit a cache of max_len={cache.max_len}."
        )
    counts = _token_counts(cache, num_tokens, chunk)
    if _is_concrete(cache.lengths) and bool(jnp.any(cache.lengths + counts > cache.max_len)):
        raise CacheOverflowError(_overflow_message(cache, counts))

    # Tokens past max_len are dropped; `advance` flags the overflow.
    fitting = jnp.minimum(counts, jnp.maximum(cache.max_len - cache.lengths, 0))
    # A sequence's first chunk sets its means; the chunk is then stored relative to them.
    means = {
        name: _first_chunk_mean(mean, x, cache.lengths, fitting)
        for name, mean, x in (("key_mean", lc.key_mean, k), ("value_mean", lc.value_mean, v))
        if mean is not None
    }
    lc = dataclasses.replace(lc, **means)
    k, v = to_stored_frame(lc, k, v)

    def write(stored, new):
        return quantize_into_cache(new, stored, cache.lengths, num_tokens=fitting, ring=lc.ring)

    if lc.key_rounding is None:
        stored_k = write(lc.k, k)
    else:
        data, scales = key_rounding.round_keys(k.astype(jnp.float32), lc.k.fmt, lc.k.global_scale, lc.key_rounding)
        stored_k = write_rows(lc.k, data, scales, cache.lengths, fitting, ring=lc.ring)
    written = dataclasses.replace(lc, k=stored_k, v=write(lc.v, v))
    if lc.keys_per_channel:
        written = dataclasses.replace(written, k=_write_key_blocks(lc, written.k, k, cache.lengths, fitting))
    if lc.keeps_positions:
        written = dataclasses.replace(
            written,
            kept_k=_write_kept(lc, lc.kept_k, k, cache.lengths, fitting),
            kept_v=_write_kept(lc, lc.kept_v, v, cache.lengths, fitting),
        )
    slots = token_slots(
        cache.lengths[:, None], fitting[:, None], jnp.arange(chunk)[None, :], lc.capacity, lc.ring
    )
    kept = (slots < lc.capacity)[:, :, None, None]
    bad = jnp.any(kept & ~jnp.isfinite(k)) | jnp.any(kept & ~jnp.isfinite(v))
    layers = cache.layers[:layer] + (written,) + cache.layers[layer + 1 :]
    return dataclasses.replace(cache, layers=layers, nonfinite=cache.nonfinite | bad)


def to_stored_frame(lc: LayerCache, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, T, Hkv, D] in the frame `lc` stores them in: minus its mean
    key and value (centered layers), then Hadamard-rotated (rotated layers)."""
    if lc.key_mean is not None:
        k = k.astype(jnp.float32) - lc.key_mean[:, None]
    if lc.value_mean is not None:
        v = v.astype(jnp.float32) - lc.value_mean[:, None]
    if lc.keys_rotated:
        k = hadamard_rotate(k)
    if lc.values_rotated:
        v = hadamard_rotate(v)
    return k, v


def _first_chunk_mean(mean: jax.Array, x: jax.Array, lengths, counts) -> jax.Array:
    """mean [B, Hkv, D], with the mean of the chunk x [B, T, Hkv, D] (its first
    `counts` tokens) for each sequence the chunk starts (length 0); kept elsewhere."""
    real = (jnp.arange(x.shape[1])[None, :] < counts[:, None])[:, :, None, None]
    chunk_mean = jnp.sum(jnp.where(real, x.astype(jnp.float32), 0.0), axis=1) / jnp.maximum(counts, 1)[:, None, None]
    starts = (lengths == 0) & (counts > 0)
    return jnp.where(starts[:, None, None], chunk_mean, mean)


def _write_kept(lc: LayerCache, kept: jax.Array, new: jax.Array, lengths, counts) -> jax.Array:
    """kept [B, Hkv, F + R, D] with the chunk new [B, T, Hkv, D] (its first `counts`
    tokens, at positions lengths ..) written: positions < F to slots 0.., the newest R
    of the chunk to the ring."""
    chunk = new.shape[1]
    positions = lengths[:, None] + jnp.arange(chunk)[None, :]
    real = jnp.arange(chunk)[None, :] < counts[:, None]
    dropped = kept.shape[2]  # an out-of-range slot: the write is dropped
    first = jnp.where(real & (positions < lc.keep_first), positions, dropped)
    ring = jnp.full_like(positions, dropped)
    if lc.keep_recent:
        newest = real & (positions >= (lengths + counts)[:, None] - lc.keep_recent)
        ring = jnp.where(newest, lc.keep_first + positions % lc.keep_recent, dropped)
    values = _as_kept(new, kept.dtype).transpose(0, 2, 1, 3)

    def per_sequence(stored, slots_first, slots_ring, chunk_values):
        stored = stored.at[:, slots_first].set(chunk_values, mode="drop")
        return stored.at[:, slots_ring].set(chunk_values, mode="drop")

    return jax.vmap(per_sequence)(kept, first, ring, values)


def check_kept_dtype(name: str) -> jnp.dtype:
    """The dtype of kept copies in format `name` (one of KEPT_DTYPES); refuses others."""
    if name not in KEPT_DTYPES:
        raise ValueError(f"kept_dtype: unknown {name!r}; valid: {', '.join(KEPT_DTYPES)}.")
    return jnp.dtype(get_codec(name).data_dtype)


def kept_dtype_name(dtype) -> str:
    """The format (one of KEPT_DTYPES) of kept copies of `dtype`."""
    return next(name for name in KEPT_DTYPES if check_kept_dtype(name) == dtype)


def _as_kept(x: jax.Array, dtype) -> jax.Array:
    """x as kept copies of `dtype` store it: their format's encode at scale 1 (finite
    values past its range saturate, as the cache formats store them)."""
    data, _ = get_codec(kept_dtype_name(dtype)).encode(x, jnp.float32(1.0))
    return data


def _write_key_blocks(before: LayerCache, stored: QuantizedTensor, k: jax.Array, lengths, counts) -> QuantizedTensor:
    """stored keys with every block of positions that the chunk k [B, T, Hkv, D] (its
    first `counts` tokens at `lengths`) completes quantized per channel; the block's
    earlier positions come from the kept ring before the write. Values are rounded to
    bf16 first, as the ring holds them, so a block quantizes alike whether it filled in
    one chunk or over several."""
    block = stored.codec.block_size
    batch, chunk = k.shape[:2]
    blocks = (lengths // block)[:, None] + jnp.arange(chunk // block + 2)[None, :]  # [B, M]
    ends = blocks * block + block - 1
    complete = (ends >= lengths[:, None]) & (ends < (lengths + counts)[:, None])
    positions = blocks[:, :, None] * block + jnp.arange(block)  # [B, M, bs]
    offsets = positions - lengths[:, None, None]
    from_chunk = jax.vmap(lambda x, t: x[jnp.clip(t, 0, chunk - 1)])(k.astype(jnp.bfloat16), offsets)
    ring_slots = before.keep_first + positions % before.keep_recent
    from_ring = jax.vmap(lambda kept, s: jnp.moveaxis(kept[:, s], 0, -2))(before.kept_k, ring_slots)
    values = jnp.where((offsets >= 0)[..., None, None], from_chunk, from_ring)  # [B, M, bs, Hkv, D]
    values = jnp.moveaxis(values, 3, 1).astype(jnp.float32)  # [B, Hkv, M, bs, D]
    data, scales = channel_keys.encode_blocks(values, stored.fmt, stored.global_scale)
    rows = jnp.where(complete[:, :, None], positions, stored.data.shape[2]).reshape(batch, -1)

    def put(array, new):  # array [B, Hkv, S, w]; new [B, Hkv, M, bs, w]
        new = new.reshape(*new.shape[:2], -1, new.shape[-1])
        return jax.vmap(lambda a, r, n: a.at[:, r].set(n, mode="drop"))(array, rows, new)

    return dataclasses.replace(stored, data=put(stored.data, data), scales=put(stored.scales, scales))


def kept_values(
    before: LayerCache, start: jax.Array, stored_k: jax.Array, stored_v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The full-precision keys and values by position that the queries of a chunk read
    from a layer keeping positions (`LayerCache.kept_k`), for attention.

    Args:
      before: the layer as it was before the chunk was written (a chunk's own writes
        can overwrite the recent ring that its first queries still read).
      start: int32 [B], the lengths before the chunk.
      stored_k, stored_v: float [B, T, Hkv, D], the chunk in the frame the layer stores
        it, `to_stored_frame` of the layer *after* the write (a sequence's first chunk
        sets the means of a centered layer).

    Returns:
      (full_k, full_v), float32 [B, Hkv, capacity, D], in the stored (centered,
      rotated) frame and rounded as kept (`init_cache`'s kept_dtype); positions no
      query of the chunk reads from them are 0.
    """
    capacity, chunk = before.capacity, stored_k.shape[1]
    # Kept slots by the position they held before the chunk; the chunk after them.
    held = kept_slot_positions(before, start)
    held = jnp.where(held >= 0, held, capacity)
    chunk_positions = start[:, None] + jnp.arange(chunk)[None, :]

    def by_position(kept, new):
        full = jnp.zeros((*kept.shape[:2], capacity, kept.shape[3]), jnp.float32)
        new = _as_kept(new, kept.dtype).transpose(0, 2, 1, 3)

        def per_sequence(out, kept_b, held_b, new_b, chunk_b):
            out = out.at[:, held_b].set(kept_b.astype(jnp.float32), mode="drop")
            return out.at[:, chunk_b].set(new_b.astype(jnp.float32), mode="drop")

        return jax.vmap(per_sequence)(full, kept, held, new, chunk_positions)

    return by_position(before.kept_k, stored_k), by_position(before.kept_v, stored_v)


def kept_slot_positions(layer: LayerCache, lengths: jax.Array) -> jax.Array:
    """int32 [B, keep_first + keep_recent]: the position each slot of the layer's kept
    copies (`LayerCache.kept_k`) holds once the sequences have `lengths` [B] tokens, or
    -1 where it holds none."""
    batch = lengths.shape[0]
    first = jnp.broadcast_to(jnp.arange(layer.keep_first), (batch, layer.keep_first))
    ring = positions_in_slots(lengths, layer.keep_recent, ring=True) if layer.keep_recent else first[:, :0]
    held = jnp.concatenate([first, ring], axis=1)
    return jnp.where((held >= 0) & (held < lengths[:, None]), held, -1)


def advance(cache: KVCache, num_tokens: jax.Array | int) -> KVCache:
    """Moves each sequence's length on by num_tokens (int or int32 [B])."""
    counts = jnp.broadcast_to(jnp.asarray(num_tokens, jnp.int32), (cache.batch_size,))
    new_lengths = cache.lengths + counts
    over = jnp.any(new_lengths > cache.max_len)
    if _is_concrete(over) and bool(over):
        raise CacheOverflowError(_overflow_message(cache, counts))
    return dataclasses.replace(
        cache,
        lengths=jnp.minimum(new_lengths, cache.max_len),
        overflowed=cache.overflowed | over,
    )


def update(
    cache: KVCache,
    ks: Sequence[jax.Array],
    vs: Sequence[jax.Array],
    num_tokens: jax.Array | int | None = None,
) -> KVCache:
    """Writes one chunk [B, T, Hkv, D] per layer and advances the lengths."""
    if len(ks) != len(cache.layers) or len(vs) != len(cache.layers):
        raise ValueError(
            f"ks, vs: expected {len(cache.layers)} layers, got {len(ks)} and {len(vs)}."
        )
    for layer, (k, v) in enumerate(zip(ks, vs)):
        cache = write_layer(cache, layer, k, v, num_tokens)
    return advance(cache, ks[0].shape[1] if num_tokens is None else num_tokens)


def positions_in_slots(lengths: jax.Array, capacity: int, ring: bool) -> jax.Array:
    """int32 [B, capacity]: the position each slot would hold once a sequence has
    `lengths` [B] tokens. A ring slot holds the newest position p < length with
    p % capacity == slot; a slot whose position is < 0 or >= length holds none."""
    slots = jnp.arange(capacity)[None, :]
    if not ring:
        return jnp.broadcast_to(slots, (lengths.shape[0], capacity))
    newest = lengths[:, None] - 1
    return newest - (newest - slots) % capacity


def slot_positions(cache: KVCache, layer: int) -> jax.Array:
    """int32 [B, capacity]: the position held in each slot, or -1 where none is."""
    lc = cache.layers[layer]
    positions = positions_in_slots(cache.lengths, lc.capacity, lc.ring)
    held = (positions >= 0) & (positions < cache.lengths[:, None])
    return jnp.where(held, positions, -1)


def read_layer(
    cache: KVCache, layer: int, dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The dequantized keys and values of one layer, for references and tests.

    Returns:
      (k, v, positions): k and v [B, Hkv, capacity, D] in `dtype`, and the int32
      [B, capacity] positions of the slots (-1 for empty slots, whose K/V are
      meaningless).
    """
    from fp4kv_jax.formats import dequantize

    lc = cache.layers[layer]
    k = channel_keys.decode(lc.k).astype(dtype) if lc.keys_per_channel else dequantize(lc.k, dtype)
    v = dequantize(lc.v, dtype)
    # The rotation is its own inverse.
    k = hadamard_rotate(k) if lc.keys_rotated else k
    v = hadamard_rotate(v) if lc.values_rotated else v
    if lc.key_mean is not None:
        k = (k + lc.key_mean[:, :, None]).astype(dtype)
    if lc.value_mean is not None:
        v = (v + lc.value_mean[:, :, None]).astype(dtype)
    return k, v, slot_positions(cache, layer)


def set_global_scales(
    cache: KVCache, k_scales: Sequence[float], v_scales: Sequence[float]
) -> KVCache:
    """Sets the per-layer float32 global scales of K and V (fp8, nvfp4 tensors).

    Only an empty cache may change scale: stored values are relative to it. Tensors
    whose format has no global scale must get None.
    """
    if _is_concrete(cache.lengths) and bool(jnp.any(cache.lengths > 0)):
        raise ValueError("cache: global scales can only be set on an empty cache.")
    layers = []
    for layer, (lc, ks, vs) in enumerate(zip(cache.layers, k_scales, v_scales, strict=True)):
        tensors = {}
        for name, stored, scale in (("k", lc.k, ks), ("v", lc.v, vs)):
            has = get_codec(stored.fmt).has_global_scale
            if has != (scale is not None):
                raise ValueError(
                    f"{name}_scales: layer {layer} ({stored.fmt}) needs {'a float' if has else 'None'}."
                )
            if has:
                tensors[name] = dataclasses.replace(stored, global_scale=jnp.asarray(scale, jnp.float32))
        layers.append(dataclasses.replace(lc, **tensors))
    return dataclasses.replace(cache, layers=tuple(layers))


def check_cache(cache: KVCache) -> KVCache:
    """Raises CacheOverflowError or NonFiniteKVError if a sticky flag is set."""
    if bool(cache.overflowed):
        raise CacheOverflowError(
            f"cache overflow: a write went past max_len={cache.max_len}; the tokens past "
            "it were dropped. Build the cache with a larger max_len."
        )
    if bool(cache.nonfinite):
        raise NonFiniteKVError("cache: NaN or infinite keys or values were written.")
    return cache
