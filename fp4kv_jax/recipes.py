"""Cache recipes: a cache dtype plus accuracy options, spelled as one string.

    recipe_from_name("nvfp4+hadamard")  # nvfp4, keys stored Hadamard-rotated

`fp4kv ablate` scores one row per recipe; `fp4kv generate --cache-dtype` takes one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fp4kv_jax import cache as kv_cache
from fp4kv_jax.formats import get_codec

# Suffixes a recipe name may add to a cache dtype, and the `init_cache` options each
# turns on: "nvfp4+hadamard" is nvfp4 with keys stored Hadamard-rotated,
# "nvfp4+hadamard+hadamard_v" with values rotated too; "nvfp4+keys_only" stores only
# the keys in nvfp4 and the values in bf16, "nvfp4+values_only" the other way round;
# "nvfp4+fp8_keys" stores the keys in fp8_e4m3 and the values in nvfp4 (the short
# spelling of "nvfp4+keys=fp8_e4m3");
# "nvfp4+channel_keys+recent=16" scales the keys per channel over blocks of 16
# positions, staged in the recent window; "nvfp4+center_keys" stores the keys minus
# each sequence's first-chunk mean key, "+center_values" the values so;
# "nvfp4+first=8+recent=80+kept_fp8" stores the kept copies (below) in fp8 e4m3;
# "nvfp4+round_keys" rounds the keys against calibrated query moments
# (`fp4kv_jax.key_rounding`), which building its cache then needs.
RECIPE_OPTIONS = {
    "hadamard": (("rotate_keys", True),),
    "hadamard_v": (("rotate_values", True),),
    "keys_only": (("value_dtype", "bf16"),),
    "values_only": (("key_dtype", "bf16"),),
    "fp8_keys": (("key_dtype", "fp8_e4m3"),),
    "channel_keys": (("per_channel_keys", True),),
    "center_keys": (("center_keys", True),),
    "center_values": (("center_values", True),),
    "kept_fp8": (("kept_dtype", "fp8_e4m3"),),
    "round_keys": (("round_keys", True),),
}
# Suffixes with a count: "nvfp4+bf16_first=2" keeps the first 2 layers in bf16;
# "nvfp4+first=4+recent=32" keeps the first 4 and the last 32 positions of every layer
# in bf16 too (KIVI's full-precision sinks and recent window).
_BF16_FIRST = "bf16_first="
_COUNTED_OPTIONS = {"first=": "keep_first", "recent=": "keep_recent"}
# Suffixes naming a format: "nvfp4_search+values=mxfp4" stores the keys in nvfp4_search
# and the values in mxfp4, "mxfp4+keys=nvfp4" the other way round.
_FORMAT_OPTIONS = {"keys=": "key_dtype", "values=": "value_dtype"}
# The options that change what the cache stores, and so its memory figures.
_STORAGE_OPTIONS = (
    "key_dtype", "value_dtype", "bf16_layers", "keep_first", "keep_recent", "kept_dtype", "center_keys",
    "center_values", "round_keys",
)


@dataclasses.dataclass(frozen=True)
class CacheRecipe:
    """A cache dtype with accuracy options, named by one string (an ablation row, or
    what `fp4kv generate --cache-dtype` takes).

    Attributes:
      name: the recipe's name, e.g. "nvfp4+hadamard".
      cache_dtype: the cache format.
      options: more `fp4kv_jax.cache.init_cache` keyword arguments, as (name, value)
        pairs.
    """

    name: str
    cache_dtype: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def storage(self) -> dict:
        """`fp4kv_jax.memory` keyword arguments for this recipe's memory figures."""
        return dict(cache_dtype=self.cache_dtype, **{
            name: value for name, value in self.options if name in _STORAGE_OPTIONS
        })

    @property
    def rounds_keys(self) -> bool:
        """Whether the keys are rounded against calibrated query moments ("+round_keys")."""
        return dict(self.options).get("round_keys", False)

    def cache_options(self, query_moments: np.ndarray | None = None) -> dict:
        """This recipe's `init_cache` keyword arguments. A recipe that rounds keys needs
        `query_moments` (`fp4kv_jax.key_rounding.query_moments` on a calibration text)."""
        options = dict(self.options)
        if options.pop("round_keys", False):
            if query_moments is None:
                raise ValueError(
                    f"query_moments: recipe {self.name!r} rounds keys against calibrated query moments; "
                    "pass fp4kv_jax.key_rounding.query_moments(model, token_windows)."
                )
            options["query_moments"] = query_moments
        return options

    def build_cache(
        self, model, batch_size: int, max_len: int, query_moments: np.ndarray | None = None
    ) -> kv_cache.KVCache:
        """An empty cache of this recipe for `batch_size` sequences of `max_len` tokens."""
        return model.init_cache(batch_size, max_len, self.cache_dtype, **self.cache_options(query_moments))


def recipe_from_name(name: str) -> CacheRecipe:
    """The recipe a row name spells: a cache dtype, then optional "+suffix" parts.

    For example "fp4_e2m1" or "nvfp4+hadamard"; suffixes are the keys of RECIPE_OPTIONS,
    "bf16_first=N" (the first N layers stored in bf16, a per-layer dtype), "first=N"
    and "recent=N" (the first and the last N positions also kept in bf16, or in fp8 with
    "+kept_fp8"), "keys=FORMAT" and "values=FORMAT" (the keys, or the values, stored in
    another format).
    """
    cache_dtype, *suffixes = name.split("+")
    get_codec(cache_dtype, arg="cache_dtype")
    options = []
    unknown = []
    for suffix in suffixes:
        key, _, value = suffix.partition("=")
        prefix = key + "="
        if suffix in RECIPE_OPTIONS:
            options += RECIPE_OPTIONS[suffix]
        elif prefix == _BF16_FIRST and value.isdigit():
            options.append(("bf16_layers", tuple(range(int(value)))))
        elif prefix in _COUNTED_OPTIONS and value.isdigit():
            options.append((_COUNTED_OPTIONS[prefix], int(value)))
        elif prefix in _FORMAT_OPTIONS:
            get_codec(value, arg=f"cache_dtype (+{prefix}FORMAT)")
            options.append((_FORMAT_OPTIONS[prefix], value))
        else:
            unknown.append(suffix)
    if unknown:
        raise ValueError(
            f"cache_dtype: unknown recipe suffix(es) {unknown} in {name!r}; valid: "
            f"{', '.join('+' + key for key in RECIPE_OPTIONS)}, +{_BF16_FIRST}N, "
            f"{', '.join('+' + prefix + 'N' for prefix in _COUNTED_OPTIONS)}, "
            f"{', '.join('+' + prefix + 'FORMAT' for prefix in _FORMAT_OPTIONS)}."
        )
    return CacheRecipe(name=name, cache_dtype=cache_dtype, options=tuple(options))
