"""`nvfp4_search_b8`: `nvfp4_search` over blocks of 8 (5 bits per element).

The same e4m3 block-scale search, each scale covering 8 values instead of 16: one more
byte of scales per 16 values (5 bits an element against 4.5) buys a finer fit where
the keys' error dominates FP4's damage. The bytes decode as nvfp4 with 8-value blocks.
"""

from __future__ import annotations

from fp4kv_jax.formats.nvfp4_search import Nvfp4SearchCodec
from fp4kv_jax.formats.registry import register


class Nvfp4SearchBlock8Codec(Nvfp4SearchCodec):
    name = "nvfp4_search_b8"
    block_size = 8


register(Nvfp4SearchBlock8Codec())
