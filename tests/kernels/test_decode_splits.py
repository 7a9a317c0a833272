"""How decode kernels split a sequence's positions across programs (splits.plan_waves)."""

import pytest

from fp4kv_jax.kernels.decode_attention import splits


@pytest.mark.parametrize(
    "batch, warps, resident, expected",
    [
        (32, 12, 132, 1),  # 256 programs in two full waves: no split, no merge
        (16, 12, 132, 1),  # 128 programs in one wave
        (8, 12, 132, 2),  # 64 programs would leave half the SMs idle
        (32, 4, 396, 3),  # 768 programs of one warpgroup: two full waves
        (1, 12, 132, 16),  # 8 programs: 16 splits fill one wave
    ],
)
def test_the_split_count_fills_the_waves(batch, warps, resident, expected):
    chunk, num_splits = splits.plan_waves(batch, 8, 8192, 32, warps, resident, None)
    assert num_splits == expected
    assert chunk % 32 == 0 and (num_splits - 1) * chunk < 8192 <= num_splits * chunk


def test_every_warp_gets_a_block_and_an_explicit_count_is_kept():
    _, num_splits = splits.plan_waves(1, 1, 256, 32, 12, 132, None)  # 8 blocks for 12 warps
    assert num_splits == 1
    assert splits.plan_waves(32, 8, 8192, 32, 12, 132, 3) == (2752, 3)
