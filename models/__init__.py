"""Model configurations and Flax models. Installed as `fp4kv_jax.models`.

    model = fp4kv_jax.models.from_pretrained("smollm2-135m", dtype=jnp.float32)
"""


def __getattr__(name: str):
    # Imported on first use: the cache imports models.configs, and the models import
    # the cache, so loading them eagerly here would be circular.
    if name == "from_pretrained":
        from fp4kv_jax.models.loading import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'fp4kv_jax.models' has no attribute {name!r}")
