"""An exploration for issue 7's pure-FP4 goal: `fp4kv ablate` with the Hadamard rotation
randomized by sign flips, R = S H S (S a diagonal of seeded random signs), as QuaRot
rotates, in place of the plain Sylvester H. R is still symmetric, orthogonal and its own
inverse, so every reader of a rotated cache (the ops, the cache's read-back) works
unchanged; only which channels each quantization block mixes with which signs changes.

    python docs/ablation/randomized_hadamard_experiment.py --seed 0 -- \
        --cache-dtypes nvfp4_4over6+center_keys+hadamard --out DIR

Every `+hadamard` and `+hadamard_v` row of the run is rotated so.
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

from fp4kv_jax import cli, rotation


def randomized_hadamard(plain, seed: int):
    """hadamard_matrix(size) -> S H S, float32 [size, size]."""

    @functools.cache
    def matrix(size: int) -> np.ndarray:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size)
        return (signs[:, None] * plain(size) * signs[None, :]).astype(np.float32)

    return matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random signs")
    parser.add_argument("ablate_args", nargs=argparse.REMAINDER, help="after --: `fp4kv ablate` arguments")
    args = parser.parse_args()
    rotation.hadamard_matrix = randomized_hadamard(rotation.hadamard_matrix, args.seed)
    ablate_args = args.ablate_args[1:] if args.ablate_args[:1] == ["--"] else args.ablate_args
    return cli.main(["ablate", *ablate_args])


if __name__ == "__main__":
    sys.exit(main())
