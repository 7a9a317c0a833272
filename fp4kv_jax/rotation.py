"""The Hadamard rotation of keys and queries along head_dim (an accuracy recipe).

Attention scores depend on keys only through q . k, which a shared orthogonal
rotation leaves unchanged: (q H) . (k H) = q . k. Rotating by the normalized
Walsh-Hadamard matrix H mixes every channel into every other, so each quantization
block sees a sum of many channels (close to Gaussian) instead of a few heavy ones.
Whether a format then loses less is measured, not assumed: `fp4kv ablate
--cache-dtypes nvfp4,nvfp4+hadamard`. A cache built with `rotate_keys=True` stores keys
as k H; attention rotates queries the same way. H is symmetric and H H = I, so
k = (k H) H reads the keys back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def hadamard_matrix(size: int) -> np.ndarray:
    """The normalized Walsh-Hadamard matrix float32 [size, size] (Sylvester order).

    `size` must be a power of two; entries are +-1 / sqrt(size).
    """
    if size < 1 or size & (size - 1):
        raise ValueError(f"head_dim: the Hadamard rotation needs a power of two, got {size}.")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return (matrix / np.sqrt(size)).astype(np.float32)


def hadamard_rotate(x: jax.Array) -> jax.Array:
    """x [..., D] @ H in float32, returned in x's dtype; its own inverse."""
    rotation = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.matmul(x.astype(jnp.float32), rotation, precision="highest").astype(x.dtype)
