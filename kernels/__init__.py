"""Attention and cache ops, each with a float32 jnp reference beside its Pallas kernels.

Installed as `fp4kv_jax.kernels`.
"""
