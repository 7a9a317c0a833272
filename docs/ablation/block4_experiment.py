"""How docs/ablation/block4_8k_pydoc was scored: `fp4kv ablate` with every layer read
through the reference attention. The run came before `nvfp4_search_b4` shipped, when
this script added that format (the same codec) and no kernel read blocks of 4.

    python docs/ablation/block4_experiment.py --device gpu --context 8192 --corpus FILE --out DIR \\
        --cache-dtypes nvfp4_search_b4+values=nvfp4_search+center_keys+hadamard+hadamard_v
"""

from __future__ import annotations

import sys

from fp4kv_jax import cli
from fp4kv_jax.kernels import tiles


def main() -> int:
    tiles.default_attention_implementation = lambda layer: "reference"
    return cli.main(["ablate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
