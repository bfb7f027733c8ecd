"""The shared masked-attention helpers."""

import torch

from sasha_models.attention import GatedAttention, masked_softmax, random_topk_mask


def test_masked_softmax_zero_on_masked_and_sums_to_one():
    logits = torch.randn(3, 7)
    mask = torch.rand(3, 7) > 0.4
    mask[:, 0] = True
    p = masked_softmax(logits, mask, dim=-1)
    assert torch.equal(p[~mask], torch.zeros_like(p[~mask]))
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    # Equals a softmax over the valid entries only.
    for i in range(3):
        torch.testing.assert_close(p[i, mask[i]], torch.softmax(logits[i, mask[i]], -1))


def test_masked_softmax_all_masked_gives_zeros_and_finite_grads():
    logits = torch.randn(2, 5, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = True
    p = masked_softmax(logits, mask, dim=-1)
    assert torch.equal(p[1], torch.zeros(5))
    assert p[0, 2] == 1.0
    (p * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_softmax_no_mask_and_broadcast_and_dim():
    logits = torch.randn(4, 6, 2)
    torch.testing.assert_close(masked_softmax(logits, None, 1), torch.softmax(logits, 1))
    mask = torch.tensor([True, True, False, True, False, True]).view(1, 6, 1)
    p = masked_softmax(logits, mask, dim=1)
    assert (p[:, 2] == 0).all() and (p[:, 4] == 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(4, 2))


def test_gated_attention_shapes_and_rowwise():
    att = GatedAttention(8, 5, n_branches=3)
    h = torch.randn(2, 10, 8)
    a = att(h)
    assert a.shape == (2, 10, 3) and a.dtype == torch.float32
    torch.testing.assert_close(att(h[:, 4:5]), a[:, 4:5])


def test_random_topk_mask_drops_only_top_valid():
    g = torch.Generator().manual_seed(0)
    logits = torch.arange(20.0).repeat(3, 1)  # instance 19 is the most attended
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 15:] = False  # padding must never be "dropped" back in
    out = random_topk_mask(logits, mask, top_k=10, drop_frac=0.3, generator=g)
    dropped = mask & ~out
    assert (dropped.sum(-1) == 3).all()  # floor(10 * 0.3)
    assert not (out & ~mask).any()
    assert (dropped[0].nonzero() >= 10).all()  # only among the top 10
    assert (dropped[1].nonzero() >= 5).all() and (dropped[1].nonzero() < 15).all()


def test_random_topk_mask_keeps_one_and_respects_small_bags():
    logits = torch.randn(4, 3)
    mask = torch.tensor([[True, False, False]] * 4)
    out = random_topk_mask(logits, mask, top_k=20, drop_frac=0.99)
    assert torch.equal(out, mask)  # a single valid instance is never dropped
    assert torch.equal(random_topk_mask(logits, None, 20, 0.0), torch.ones(4, 3, dtype=bool))


def test_random_topk_mask_is_random_and_seeded():
    logits = torch.randn(50, 30)
    a = random_topk_mask(logits, None, 10, 0.5, torch.Generator().manual_seed(1))
    b = random_topk_mask(logits, None, 10, 0.5, torch.Generator().manual_seed(1))
    c = random_topk_mask(logits, None, 10, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
