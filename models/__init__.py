"""Model configurations and Flax models. Installed as `fp4kv_jax.models`."""
