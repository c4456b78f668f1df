import pytest
import torch
import torch.nn.functional as F

from dawn.models.attention import (
    RelativePositionBias,
    RotaryEmbedding,
    full_attention_bias,
    local_attention,
    relative_position_bucket,
)


def masked_full_attention(q, k, v, window, bias_fn):
    bias = full_attention_bias(q.shape[-2], bias_fn, window, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.mark.parametrize("t,window,block", [(12, 4, None), (200, 40, None), (203, 40, 32), (97, 10, 7), (50, 40, None)])
def test_local_attention_equals_masked_full_attention(t, window, block):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(3, 8, t, 32, generator=g) for _ in range(3))
    rpb = RelativePositionBias(heads=8, num_buckets=32, max_distance=32)
    torch.nn.init.normal_(rpb.relative_attention_bias.weight, generator=g)
    ours = local_attention(q, k, v, window, rpb, block=block)
    ref = masked_full_attention(q, k, v, window, rpb)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-5


def test_local_attention_mask_cache_is_shared_between_calls():
    g = torch.Generator().manual_seed(0)
    rpb = RelativePositionBias(heads=4, num_buckets=32, max_distance=32)
    torch.nn.init.normal_(rpb.relative_attention_bias.weight, generator=g)
    cache = {}
    for n in (3, 2):  # two chunks of sequences of the same length reuse the masks of the first
        q, k, v = (torch.randn(n, 4, 97, 16, generator=g) for _ in range(3))
        ours = local_attention(q, k, v, 10, rpb, block=16, mask_cache=cache)
        assert (ours - masked_full_attention(q, k, v, 10, rpb)).abs().max() < 1e-5
    assert 0 < len(cache) <= 4  # first block, interior blocks, the last two (97 = 6 * 16 + 1)


def test_local_attention_without_window_is_full_attention():
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    assert torch.allclose(local_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_t5_buckets_match_reference_tables():
    # U-Net: 32 buckets / max distance 32 (ARCHITECTURE.md 4.5); PBNet: 128 / 128 (5.2).
    rel = torch.tensor([0, -1, -7, 1, 7, -27, 27, -1000, 1000])
    assert relative_position_bucket(rel, 32, 32).tolist() == [0, 1, 7, 17, 23, 15, 31, 15, 31]
    rel = torch.tensor([-1, 1, 32, 127, -127, 2000])
    assert relative_position_bucket(rel, 128, 128).tolist() == [1, 65, 96, 127, 63, 127]


def test_rotary_is_interleaved_and_partial():
    rope = RotaryEmbedding(4, freqs=[1.0, 0.01])
    x = torch.zeros(1, 2, 32)
    x[..., 0] = 1.0  # pair (0, 1) rotates with frequency 1
    x[..., 10] = 3.0  # beyond the rotary dims: unchanged
    y = rope(x)
    assert torch.allclose(y[0, 1, :2], torch.tensor([torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))]))
    assert y[0, 1, 10] == 3.0 and torch.equal(y[0, 0], x[0, 0])
