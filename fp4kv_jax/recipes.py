"""Cache recipes: a cache dtype plus accuracy options, spelled as one string.

    recipe_from_name("nvfp4+hadamard")  # nvfp4, keys stored Hadamard-rotated

`fp4kv ablate` scores one row per recipe; `fp4kv generate --cache-dtype` takes one.
"""

from __future__ import annotations

import dataclasses

from fp4kv_jax import cache as kv_cache
from fp4kv_jax.formats import get_codec

# Suffixes a recipe name may add to a cache dtype, and the `init_cache` options each
# turns on: "nvfp4+hadamard" is nvfp4 with keys stored Hadamard-rotated,
# "nvfp4+hadamard+hadamard_v" with values rotated too.
RECIPE_OPTIONS = {
    "hadamard": (("rotate_keys", True),),
    "hadamard_v": (("rotate_values", True),),
}


@dataclasses.dataclass(frozen=True)
class CacheRecipe:
    """A cache dtype with accuracy options, named by one string (an ablation row, or
    what `fp4kv generate --cache-dtype` takes).

    Attributes:
      name: the recipe's name, e.g. "nvfp4+hadamard".
      cache_dtype: the cache format; it alone sets the memory figures.
      options: more `fp4kv_jax.cache.init_cache` keyword arguments, as (name, value)
        pairs.
    """

    name: str
    cache_dtype: str
    options: tuple[tuple[str, object], ...] = ()

    def build_cache(self, model, batch_size: int, max_len: int) -> kv_cache.KVCache:
        """An empty cache of this recipe for `batch_size` sequences of `max_len` tokens."""
        return model.init_cache(batch_size, max_len, self.cache_dtype, **dict(self.options))


def recipe_from_name(name: str) -> CacheRecipe:
    """The recipe a row name spells: a cache dtype, then optional "+suffix" parts.

    For example "fp4_e2m1" or "nvfp4+hadamard"; suffixes are the keys of RECIPE_OPTIONS.
    """
    cache_dtype, *suffixes = name.split("+")
    get_codec(cache_dtype, arg="cache_dtype")
    unknown = [suffix for suffix in suffixes if suffix not in RECIPE_OPTIONS]
    if unknown:
        raise ValueError(
            f"cache_dtype: unknown recipe suffix(es) {unknown} in {name!r}; valid: "
            f"{', '.join('+' + key for key in RECIPE_OPTIONS)}."
        )
    options = tuple(option for suffix in suffixes for option in RECIPE_OPTIONS[suffix])
    return CacheRecipe(name=name, cache_dtype=cache_dtype, options=options)
