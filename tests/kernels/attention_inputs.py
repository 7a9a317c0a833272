"""Inputs and measures shared by the attention kernels' tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp4kv_jax.models.configs import ModelConfig


def one_layer_config(heads, kv_heads, head_dim, window=None):
    """A one-layer config with the given heads, sliding when `window` is set."""
    return ModelConfig(
        architecture="gpt_oss", vocab_size=8, hidden_size=64, intermediate_size=8,
        num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        layer_types=("sliding_attention" if window else "full_attention",),
        sliding_window=window,
    )


def realistic_keys(key, shape):
    """[B, T, Hkv, D] keys with two outlier channels, rotated by RoPE."""
    k = jax.random.normal(key, shape)
    d = shape[-1]
    k = k.at[..., jnp.array([1, d // 2 + 3])].multiply(10.0)
    half = d // 2
    angle = jnp.arange(shape[1])[:, None] / 10000.0 ** (jnp.arange(half) / half)
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    k1, k2 = k[..., :half], k[..., half:]
    return jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)


def relative_error(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def compiled_once(make_inputs):
    """`make_inputs(*args, **kwargs)` run as one jitted program, every argument static
    (a test case's Python values): a case's set-up then compiles once instead of op by
    op, which is most of an interpret-mode test's time on CPU."""

    @functools.wraps(make_inputs)
    def wrapper(*args, **kwargs):
        args, kwargs = tuple(map(_hashable, args)), {k: _hashable(v) for k, v in kwargs.items()}
        return jax.jit(make_inputs, static_argnums=tuple(range(len(args))), static_argnames=tuple(kwargs))(
            *args, **kwargs
        )

    return wrapper


def jitted(op, *inputs, **options):
    """op(*inputs, **options) as one jitted program: array options are traced, the
    others (implementation, tile sizes) static."""
    arrays = {name: value for name, value in options.items() if isinstance(value, jax.Array)}
    static = {name: value for name, value in options.items() if name not in arrays}
    return jax.jit(functools.partial(op, **static))(*inputs, **arrays)
