"""Query-aware rounding of FP4 keys: GPTQ's error feedback, with the queries'
second moment in place of GPTQ's Hessian.

Attention reads a key only through scores q . k, so what a stored key's error e costs
on average is e^T Sigma e, Sigma = E[q q^T] over the queries that read it. Rounding each
value to its nearest E2M1 code minimizes |e|^2 instead. GPTQ's sequential rounding
minimizes e^T Sigma e greedily: channel by channel, each rounding error is pushed onto
the channels not yet rounded along Sigma's correlations, through the upper Cholesky
factor U of (Sigma + damping)^-1. The block scales stay those the format picks for the
unrounded keys, so the stored bytes are the format's own and every reader (the
reference read, the Pallas kernels) reads them unchanged; only the codes differ.

Sigma comes from a calibration text (`query_moments`): post-RoPE queries average over
positions to a statistic of the model, not of the text. Calibrated on the Shakespeare
corpus, it cuts the keys' attention KL on the Python docs to 0.50x of nearest
rounding at the same 4.5 bits (docs/ablation/README.md, "Query-aware key rounding").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4kv_jax.formats import e2m1, get_codec
from fp4kv_jax.rotation import hadamard_matrix

# Sigma's diagonal is raised by this fraction of its mean before inversion, as GPTQ
# damps its Hessian: directions no calibration query took still cost something.
DAMPING = 0.01


def rounds(fmt: str) -> bool:
    """Whether keys in format `fmt` can be rounded query-aware: packed E2M1 codes
    under block scales."""
    codec = get_codec(fmt)
    return codec.elements_per_datum == 2 and codec.block_size is not None


def query_moments(model, token_windows: np.ndarray) -> np.ndarray:
    """float32 [layers, Hkv, D, D]: E[q q^T] of each layer's queries after RoPE, over the
    positions of `token_windows` (int [W, T]) and the query heads of each KV head."""
    windows = np.asarray(token_windows)
    if windows.ndim != 2 or windows.shape[1] < 1 or not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"token_windows: expected int [windows, tokens], got {windows.dtype} {windows.shape}.")
    total = sum(np.asarray(_window_moments(model, jnp.asarray(window[None]))) for window in windows)
    return (total / len(windows)).astype(np.float32)


@nnx.jit
def _window_moments(model, input_ids: jax.Array) -> jax.Array:
    from fp4kv_jax.models.layers import rope_inverse_frequencies

    config = model.config
    length = input_ids.shape[1]
    group = config.num_heads // config.num_kv_heads
    positions = jnp.arange(length)[None]
    rope = rope_inverse_frequencies(config)
    x = model.embed_tokens[...][input_ids]
    moments = []
    for layer, block in enumerate(model.layers):
        q, _, _ = block.self_attn.project(block.input_layernorm(x), positions, rope)
        q = q[0].astype(jnp.float32).reshape(length, config.num_kv_heads, group, config.head_dim)
        moments.append(jnp.einsum("tkgd,tkge->kde", q, q, precision="highest") / (length * group))
        x, _ = block(x, positions, rope, None, layer)
    return jnp.stack(moments)


def isotropic_moments(config) -> np.ndarray:
    """float32 [layers, Hkv, D, D] identity moments, those of queries with no preferred
    direction: rounding against them is the format's nearest rounding."""
    eye = np.eye(config.head_dim, dtype=np.float32)
    return np.broadcast_to(eye, (config.num_layers, config.num_kv_heads, *eye.shape)).copy()


def rounding_factor(moments: np.ndarray, *, rotated: bool) -> jax.Array:
    """float32 [Hkv, D, D]: the upper Cholesky factor U (U^T U = (Sigma + damping)^-1)
    for one layer's query moments Sigma [Hkv, D, D], in the frame the keys are stored
    in (Hadamard-rotated when `rotated`, as the queries then are)."""
    sigma = np.asarray(moments, np.float64)
    head_dim = sigma.shape[-1]
    if rotated:
        rotation = hadamard_matrix(head_dim).astype(np.float64)
        sigma = rotation.T @ sigma @ rotation
    damping = DAMPING * np.trace(sigma, axis1=-2, axis2=-1) / head_dim
    damped = sigma + damping[:, None, None] * np.eye(head_dim)
    lower = np.linalg.cholesky(np.linalg.inv(damped))
    return jnp.asarray(np.swapaxes(lower, -1, -2), jnp.float32)


def round_keys(
    x: jax.Array, fmt: str, global_scale: jax.Array | None, factor: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Keys x float32 [B, T, Hkv, D] (in the stored frame) -> (data uint8 [B, T, Hkv,
    D/2], scales [B, T, Hkv, D/bs]) in format `fmt`: its own block scales, with codes
    rounded channel by channel against `factor` [Hkv, D, D] (`rounding_factor`).
    Blocks the format stores as non-finite keep its codes."""
    codec = get_codec(fmt)
    # The barrier keeps XLA from fusing the format's encode (a scale search, for some
    # formats) into the loop below, where CPU compiles then took minutes.
    data, scales = jax.lax.optimization_barrier(codec.encode(x, global_scale))
    one = e2m1.with_sign(e2m1.magnitude_index_nearest_even(jnp.float32(1.0)), jnp.float32(1.0))
    # Decoding the code of 1.0 everywhere gives each value's divisor: its block scale
    # (times the global one), whatever the format's scale encoding.
    divisor = codec.decode(jnp.full_like(data, one | (one << 4)), scales, global_scale)
    usable = jnp.isfinite(divisor) & (divisor > 0)
    safe = jnp.where(usable, divisor, 1.0)
    head_dim = x.shape[-1]

    def round_channel(j, carry):
        remaining, codes = carry
        value = jax.lax.dynamic_index_in_dim(remaining, j, axis=-1, keepdims=False)
        scale = jax.lax.dynamic_index_in_dim(safe, j, axis=-1, keepdims=False)
        y = value / scale
        code = e2m1.with_sign(e2m1.magnitude_index_nearest_even(jnp.abs(y)), y)
        row = jax.lax.dynamic_index_in_dim(factor, j, axis=-2, keepdims=False)  # [Hkv, D]
        diagonal = jax.lax.dynamic_index_in_dim(row, j, axis=-1, keepdims=False)  # [Hkv]
        usable_here = jax.lax.dynamic_index_in_dim(usable, j, axis=-1, keepdims=False)
        stored = jnp.where(usable_here, e2m1.value_by_bits(code) * scale, 0.0)
        # A non-finite key's miss would spread to the finite blocks of its row.
        miss = jnp.nan_to_num((value - stored) / diagonal, nan=0.0, posinf=0.0, neginf=0.0)
        remaining = remaining - miss[..., None] * row
        codes = jax.lax.dynamic_update_index_in_dim(codes, code, j, axis=-1)
        return remaining, codes

    codes = jnp.zeros(x.shape, jnp.uint8)
    _, codes = jax.lax.fori_loop(0, head_dim, round_channel, (x.astype(jnp.float32), codes))
    codes = jnp.where(usable, codes, e2m1.unpack(data))
    return e2m1.pack(codes), scales
