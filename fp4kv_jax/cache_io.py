"""Saving a KVCache to an orbax-checkpoint directory and loading it back, bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fp4kv_jax.cache import KVCache, LayerCache, check_kept_dtype, empty_tensor, kept_dtype_name

_LAYOUT_FILE = "cache_layout.json"
_ARRAYS_DIR = "arrays"


def _layout(cache: KVCache) -> dict:
    return {
        "max_len": cache.max_len,
        "batch_size": cache.batch_size,
        "layers": [
            {
                "key_fmt": lc.k.fmt, "value_fmt": lc.v.fmt, "shape": list(lc.k.shape),
                "window": lc.window, "ring": lc.ring,
                "keys_rotated": lc.keys_rotated, "values_rotated": lc.values_rotated,
                "keep_first": lc.keep_first, "keep_recent": lc.keep_recent,
                "kept_dtype": "bf16" if lc.kept_k is None else kept_dtype_name(lc.kept_k.dtype),
                "keys_per_channel": lc.keys_per_channel, "keys_centered": lc.key_mean is not None,
                "values_centered": lc.value_mean is not None, "keys_rounded": lc.key_rounding is not None,
            }
            for lc in cache.layers
        ],
    }


def _kept_buffer(spec: dict):
    kept = spec.get("keep_first", 0) + spec.get("keep_recent", 0)
    batch, heads, _, head_dim = spec["shape"]
    dtype = check_kept_dtype(spec.get("kept_dtype", "bf16"))
    return jnp.zeros((batch, heads, kept, head_dim), dtype) if kept else None


def _mean_buffer(spec: dict, flag: str):
    batch, heads, _, head_dim = spec["shape"]
    return jnp.zeros((batch, heads, head_dim), jnp.float32) if spec.get(flag, False) else None


def _rounding_buffer(spec: dict):
    _, heads, _, head_dim = spec["shape"]
    return jnp.zeros((heads, head_dim, head_dim), jnp.float32) if spec.get("keys_rounded", False) else None


def _empty_from_layout(layout: dict) -> KVCache:
    layers = tuple(
        LayerCache(
            empty_tensor(spec["key_fmt"], tuple(spec["shape"])),
            empty_tensor(spec["value_fmt"], tuple(spec["shape"])),
            spec["window"],
            spec["ring"],
            spec.get("keys_rotated", False),
            spec.get("values_rotated", False),
            _kept_buffer(spec),
            _kept_buffer(spec),
            spec.get("keep_first", 0),
            spec.get("keep_recent", 0),
            spec.get("keys_per_channel", False),
            _mean_buffer(spec, "keys_centered"),
            _mean_buffer(spec, "values_centered"),
            _rounding_buffer(spec),
        )
        for spec in layout["layers"]
    )
    return KVCache(
        layers=layers,
        lengths=jnp.zeros((layout["batch_size"],), jnp.int32),
        overflowed=jnp.zeros((), bool),
        nonfinite=jnp.zeros((), bool),
        max_len=layout["max_len"],
    )


def save_cache(directory: str | Path, cache: KVCache) -> Path:
    """Writes `cache` under `directory` (which must not exist yet); returns its path."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"directory: {directory} exists already; pick a new path.")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / _ARRAYS_DIR, cache)
    checkpointer.wait_until_finished()
    (directory / _LAYOUT_FILE).write_text(json.dumps(_layout(cache), indent=1))
    return directory


def load_cache(directory: str | Path) -> KVCache:
    """Reads a cache written by `save_cache`."""
    directory = Path(directory).absolute()
    layout_path = directory / _LAYOUT_FILE
    if not layout_path.is_file():
        raise FileNotFoundError(f"directory: {directory} holds no {_LAYOUT_FILE}; not a saved cache.")
    abstract = jax.eval_shape(lambda: _empty_from_layout(json.loads(layout_path.read_text())))
    return ocp.StandardCheckpointer().restore(directory / _ARRAYS_DIR, abstract)
