"""`nvfp4_search_b4`: `nvfp4_search` over blocks of 4 (6 bits per element).

The e4m3 block-scale search with each scale covering 4 values: three more bytes of
scales per 16 values than `nvfp4_search` (6 bits an element against 4.5). On the
Python docs at 8k context it is the one pure-FP4 recipe measured within 3% of bf16
(+2.92% as a point estimate; docs/ablation/README.md, "Blocks of 4"). The bytes decode
as nvfp4 with 4-value blocks.
"""

from __future__ import annotations

from fp4kv_jax.formats.nvfp4_search import Nvfp4SearchCodec
from fp4kv_jax.formats.registry import register


class Nvfp4SearchBlock4Codec(Nvfp4SearchCodec):
    name = "nvfp4_search_b4"
    block_size = 4


register(Nvfp4SearchBlock4Codec())
