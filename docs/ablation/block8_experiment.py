"""An exploration for issue 7's pure-FP4 goal: `fp4kv ablate` with nvfp4's blocks of 16
cut to 8 (5 bits an element), the scales chosen by nvfp4's own rule (and, for
`nvfp4_4over6` rows, by Four Over Six's), to tell what the block size buys apart from
the scale search of the `nvfp4_search_b8` format.

    python docs/ablation/block8_experiment.py --tokens 8192 --corpus FILE \\
        --cache-dtypes nvfp4+center_keys+hadamard,nvfp4_4over6+center_keys+hadamard --out DIR

Every nvfp4 and nvfp4_4over6 row of the run is stored in blocks of 8.
"""

from __future__ import annotations

import sys

from fp4kv_jax import cli
from fp4kv_jax.formats import nvfp4


def main() -> int:
    nvfp4.Nvfp4Codec.block_size = 8  # nvfp4_4over6 inherits it
    return cli.main(["ablate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
