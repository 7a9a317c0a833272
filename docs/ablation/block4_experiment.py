"""An exploration for issue 7's pure-FP4 goal at 8k context on the Python docs:
`fp4kv ablate` with `nvfp4_search_b8`'s blocks cut to 4 (6 bits an element), the
search over blocks that key_error_experiment.py found to halve the keys' attention KL
of blocks of 16.

    python docs/ablation/block4_experiment.py --device gpu --context 8192 --corpus FILE \\
        --cache-dtypes nvfp4_search_b8+values=nvfp4_search+center_keys+hadamard+hadamard_v --out DIR

Every `nvfp4_search_b8` tensor of the run is stored in blocks of 4: its rows keep the
name, and their bits/elem column counts blocks of 4. Attention reads every layer
through the reference, since the Pallas kernels take blocks of 8 or more.
"""

from __future__ import annotations

import sys

from fp4kv_jax import cli
from fp4kv_jax.formats import nvfp4_search_b8
from fp4kv_jax.kernels import tiles


def main() -> int:
    nvfp4_search_b8.Nvfp4SearchBlock8Codec.block_size = 4
    tiles.default_attention_implementation = lambda layer: "reference"
    return cli.main(["ablate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
