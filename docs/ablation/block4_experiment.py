"""An exploration for issue 7's pure-FP4 goal at 8k context on the Python docs:
`fp4kv ablate` with one more format, `nvfp4_search_b4`, the `nvfp4_search` search over
blocks of 4 (6 bits an element), which key_error_experiment.py found to halve the
keys' attention KL of blocks of 16.

    python docs/ablation/block4_experiment.py --context 8192 --corpus FILE --out DIR \\
        --cache-dtypes nvfp4_search_b4+values=nvfp4_search+center_keys+hadamard+hadamard_v

Attention reads every layer through the reference, since the Pallas kernels take
blocks of 8 or more.
"""

from __future__ import annotations

import sys

from fp4kv_jax import cli
from fp4kv_jax.formats.nvfp4_search import Nvfp4SearchCodec
from fp4kv_jax.formats.registry import register
from fp4kv_jax.kernels import tiles


class Nvfp4SearchBlock4Codec(Nvfp4SearchCodec):
    name = "nvfp4_search_b4"
    block_size = 4


def main() -> int:
    register(Nvfp4SearchBlock4Codec())
    tiles.default_attention_implementation = lambda layer: "reference"
    return cli.main(["ablate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
