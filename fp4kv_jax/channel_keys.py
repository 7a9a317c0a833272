"""Keys quantized per channel over blocks of positions (KIVI, KVQuant), kept in the
per-token arrays of their packed FP4 format.

A block of `bs` positions (bs = the format's block size) gets one block scale per
channel, from that channel's absmax over the block, instead of one per `bs` channels
of a position: outlier channels then cost only themselves. Codes stay where per-token
codes are ([..., position, D/2], two channels a byte); the block's D scales fill its
bs x D/bs per-token scale slots row-major (channel c in row c // (D/bs), column
c % (D/bs)), so the memory is the same as per-token quantization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import QuantizedTensor, e2m1, get_codec


def check_format(fmt: str, *, arg: str) -> int:
    """The token block (the format's block size) of a packed FP4 format; ValueError
    naming `arg` for others."""
    codec = get_codec(fmt, arg=arg)
    if codec.elements_per_datum != 2 or codec.block_size is None:
        raise ValueError(f"{arg}: keys per channel need a packed FP4 format (block scales), got {fmt!r}.")
    return codec.block_size


def encode_blocks(
    x: jax.Array, fmt: str, global_scale: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Blocks of positions x float32 [..., bs, D] -> (data uint8 [..., bs, D/2], scales
    [..., bs, D/bs]) in the per-token arrays' shapes."""
    codec = get_codec(fmt)
    block, head_dim = x.shape[-2], x.shape[-1]
    data, scales = codec.encode(jnp.swapaxes(x, -1, -2), global_scale)  # one block a channel
    codes = jnp.swapaxes(e2m1.unpack(data), -1, -2)  # [..., bs, D]
    return e2m1.pack(codes), scales.reshape(*x.shape[:-2], block, head_dim // block)


def decode(keys: QuantizedTensor) -> jax.Array:
    """Keys stored per channel [..., S, D] -> float32. Positions of a last, partial
    block (S not a multiple of the block size) never fill it, and read as 0."""
    block = keys.codec.block_size
    *lead, positions, half = keys.data.shape
    head_dim, blocks = 2 * half, -(-positions // block)
    padding = [(0, 0)] * len(lead) + [(0, blocks * block - positions), (0, 0)]
    data = jnp.pad(keys.data, padding).reshape(*lead, blocks, block, half)
    by_channel = e2m1.pack(jnp.swapaxes(e2m1.unpack(data), -1, -2))  # [..., blocks, D, bs/2]
    scales = jnp.pad(keys.scales, padding).reshape(*lead, blocks, head_dim, 1)
    values = keys.codec.decode(by_channel, scales, keys.global_scale)  # [..., blocks, D, bs]
    values = jnp.swapaxes(values, -1, -2).reshape(*lead, blocks * block, head_dim)
    return values[..., :positions, :]
