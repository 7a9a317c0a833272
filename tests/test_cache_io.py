"""Saving and loading a cache through orbax-checkpoint is bit-exact."""

import jax
import numpy as np
import pytest

from fp4kv_jax import cache as C
from fp4kv_jax.cache_io import load_cache, save_cache


@pytest.mark.parametrize(
    "fmt, options",
    [
        ("nvfp4", {}), ("fp8_e5m2", {}), ("mxfp4", {"value_dtype": "bf16"}),
        ("fp4_e2m1", {"keep_first": 1, "keep_recent": 3}), ("nvfp4", {"center_keys": True, "center_values": True}),
        ("nvfp4", {"keep_recent": 2, "kept_dtype": "fp8_e4m3"}),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, fmt, options):
    cache = C.init_cache("smollm2-135m", 2, 16, fmt, **options)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 64))
    cache = C.update(cache, [x] * 30, [2 * x] * 30, num_tokens=np.array([5, 2]))
    restored = load_cache(save_cache(tmp_path / "cache", cache))
    assert jax.tree.structure(restored) == jax.tree.structure(cache)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(cache)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_refuses_to_overwrite_and_to_load_a_non_cache(tmp_path):
    with pytest.raises(FileExistsError, match="directory"):
        save_cache(tmp_path, C.init_cache("smollm2-135m", 1, 4))
    with pytest.raises(FileNotFoundError, match="not a saved cache"):
        load_cache(tmp_path)
