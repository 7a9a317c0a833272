"""pallas_mosaic_warp's register plans (warp_operands), emulated on CPU: for each layer
layout the keys' decoded pairs and the queries' pairs meet in mma.sync m16n8k16 so that
every k-step multiplies matching channels (the kernel itself runs on GPUs only; its
tests are in test_decode_attention)."""

import numpy as np
import pytest

from fp4kv_jax.kernels.decode_attention.warp_operands import Float8Operands, Float16Operands, PackedFp4Operands

key_channel = PackedFp4Operands.key_channel


def _key_pair_channels(head_dim, t, word):
    """Channels of PTX_WORD_HALF_PAIRS's 4 outputs for word `word` of lane t's D/8
    bytes: output n is the pair (channel n, channel n + 4) of the word's 8 channels
    (tests/formats/test_register_decode_ptx.py checks the PTX)."""
    base = 2 * (head_dim // 8 * t + 4 * word)  # channel of the word's byte 0, low nibble
    return [(base + n, base + n + 4) for n in range(4)]


def _query_pair_channels(head_dim, t, step):
    """Channels of the kernel's two query registers for k-step `step` = 2 j + p: lane
    t holds channels [(D/4) t, (D/4)(t + 1)) as bf16 pairs, word i = channels
    (D/4) t + 2i, + 1, and the selectors 0x5410 / 0x7632 take the low / high halves of
    words 4j + p and 4j + 2 + p."""
    j, p = divmod(step, 2)
    word_channels = lambda i: (head_dim // 4 * t + 2 * i, head_dim // 4 * t + 2 * i + 1)
    first, second = word_channels(4 * j + p), word_channels(4 * j + 2 + p)
    return (first[0], second[0]), (first[1], second[1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_keys_and_queries_pair_the_same_channels(head_dim):
    for t in range(4):
        for step in range(head_dim // 16):
            pairs = _key_pair_channels(head_dim, t, step // 2)
            p = step % 2
            # A registers of rows g: a0 = pair 2p (k = 2t, 2t + 1), a2 = pair 2p + 1
            # (k = 2t + 8, 2t + 9); B registers b0b1, b2b3 the same k.
            a0, a2 = pairs[2 * p], pairs[2 * p + 1]
            b01, b23 = _query_pair_channels(head_dim, t, step)
            assert (a0, a2) == (b01, b23)
            ks = np.array([2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9])
            assert tuple(key_channel(head_dim, step, ks)) == (*a0, *a2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_channel_meets_its_query_once(head_dim):
    k = np.arange(16)
    channels = np.concatenate([key_channel(head_dim, s, k) for s in range(head_dim // 16)])
    assert sorted(channels) == list(range(head_dim))

    rng = np.random.default_rng(0)
    keys, query = rng.normal(size=(16, head_dim)), rng.normal(size=head_dim)
    scores = sum(keys[:, key_channel(head_dim, s, k)] @ query[key_channel(head_dim, s, k)] for s in range(head_dim // 16))
    np.testing.assert_allclose(scores, keys @ query, rtol=1e-12)


def _ordered_key_pair_channels(head_dim, t, step, bytes_per_element):
    """Channels of the (a0, a2) pairs of k-step `step` in the FP8 and 16-bit layouts:
    FP8's word `step` (4 codes) decodes into codes (0, 1) and (2, 3); 16-bit words
    2 step and 2 step + 1 are pairs themselves."""
    base = head_dim // 4 * t  # the lane's first channel
    if bytes_per_element == 1:
        first = base + 4 * step  # byte 4 step of the lane's quarter
        return (first, first + 1), (first + 2, first + 3)
    word = lambda i: (base + 2 * i, base + 2 * i + 1)
    return word(2 * step), word(2 * step + 1)


@pytest.mark.parametrize("layout, bytes_per_element", [(Float8Operands, 1), (Float16Operands, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ordered_layouts_pair_keys_and_queries_alike(layout, bytes_per_element, head_dim):
    for t in range(4):
        for step in range(head_dim // 16):
            a0, a2 = _ordered_key_pair_channels(head_dim, t, step, bytes_per_element)
            # query_steps: words 2 step and 2 step + 1 of channels (D/4) t + 2i, + 1.
            q_word = lambda i: (head_dim // 4 * t + 2 * i, head_dim // 4 * t + 2 * i + 1)
            assert (a0, a2) == (q_word(2 * step), q_word(2 * step + 1))
            ks = np.array([2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9])
            assert tuple(layout.key_channel(head_dim, step, ks)) == (*a0, *a2)
    k = np.arange(16)
    channels = np.concatenate([layout.key_channel(head_dim, s, k) for s in range(head_dim // 16)])
    assert sorted(channels) == list(range(head_dim))
