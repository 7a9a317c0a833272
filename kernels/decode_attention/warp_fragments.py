"""Which lane of a warp holds which keys, values, queries and outputs in the warp-level
decode kernel (`pallas_mosaic_warp`), for mma.sync.m16n8k16 with bf16 operands.

A lane is (g, t) = (lane // 4, lane % 4). Per 16 positions the kernel computes
S^T [16 positions, 8 heads] = K [16, D] q^T [D, 8] and then
O^T [D, 8 heads] += V^T [D, 16 positions] P^T [16, 8].

Keys: lane (g, t) loads the D/8 packed bytes at byte (D/8) t of positions g and g + 8
and decodes each 32-bit word j into two planes (`e2m1.PTX_WORD_PLANES`); mma k-step
s = 2 j + p takes plane p. The channel that k-step s's column k then holds is
`key_channel(D, s, k)`: any order serves, as long as the queries follow it.

Values: lane (g, t) loads the D/16 packed bytes at byte (D/16) g of positions 2t, 2t + 1,
2t + 8 and 2t + 9, decoded in row pairs (`e2m1.PTX_ROW_PAIR_COLUMNS`); its D/8
channels (D/8) g + 2c + r fill row g + 8 r of channel tile c. The output rows it then
holds are those same channels, contiguous, so the output needs no permutation.
"""

from __future__ import annotations

import numpy as np

LANES = 32
HEADS_PER_TILE = 8  # mma's N


def key_channel(head_dim: int, step: int, k: np.ndarray) -> np.ndarray:
    """The channel in column k (0..15) of the keys' mma k-step `step`."""
    t, pair_lane, upper = (k % 8) // 2, k % 2, k // 8
    return (head_dim // 4) * t + 8 * (step // 2) + 4 * upper + 2 * pair_lane + step % 2


def query_fragment_index(head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(head [32, D/16, 4], channel [32, D/16, 4]): element e of lane l's registers for
    k-step s of a head tile is q[head, channel] (mma's B operand: column g, rows 2t,
    2t + 1, 2t + 8, 2t + 9)."""
    lane = np.arange(LANES)[:, None, None]
    step = np.arange(head_dim // 16)[None, :, None]
    e = np.arange(4)[None, None, :]
    g, t = lane // 4, lane % 4
    k = 2 * t + e % 2 + 8 * (e // 2)
    head = np.broadcast_to(g, (LANES, head_dim // 16, 4))
    return head, key_channel(head_dim, step, k)


def value_channels(head_dim: int, g: int) -> np.ndarray:
    """[D/16 channel tiles, 2]: the channel in row g + 8 r of channel tile c, for lane
    group g; also the output channels lane (g, t) holds and writes."""
    width = head_dim // 8
    c = np.arange(head_dim // 16)[:, None]
    r = np.arange(2)[None, :]
    return width * g + 2 * c + r
