import math

import numpy as np
import pytest
import torch

from inrscrecon.field.losses import (
    LossConfig,
    csr_row_ids,
    head_loss_reference,
    kl_divergence,
    pretrain_extractor,
    representation_consistency,
    rmse,
    sparse_head_loss_reference,
)


def test_rmse_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert float(rmse(pred, target)) == pytest.approx(math.sqrt((0 + 4 + 9 + 0) / 4))


def test_kl_by_hand_nonnegative_and_zero_on_equal():
    eps = 0.01
    pred = torch.tensor([[1.0, 0.0, 3.0]])
    target = torch.tensor([[0.5, 2.0, 0.0]])
    q = (pred.numpy()[0] + eps) / (pred.numpy()[0] + eps).sum()
    p = (target.numpy()[0] + eps) / (target.numpy()[0] + eps).sum()
    assert float(kl_divergence(pred, target, eps)) == pytest.approx(
        float((q * np.log(q / p)).sum()), rel=1e-5
    )
    g = torch.rand(64, 50) * 3
    h = torch.rand(64, 50) * 3
    assert float(kl_divergence(g, h)) > 0
    assert float(kl_divergence(g, g)) == pytest.approx(0.0, abs=1e-6)


def test_head_loss_reference_combines_terms():
    torch.manual_seed(0)
    h, w, b = torch.randn(8, 5), torch.randn(7, 5), torch.randn(7)
    t = torch.rand(8, 7)
    loss, r, k = head_loss_reference(h, w, b, t, lambda_kl=0.5)
    pred = torch.nn.functional.softplus(h @ w.T + b)
    torch.testing.assert_close(r, rmse(pred, t))
    torch.testing.assert_close(loss, r + 0.5 * k)
    loss0, _, k0 = head_loss_reference(h, w, b, t, lambda_kl=0.0)
    assert float(k0) == 0 and float(loss0) == pytest.approx(float(r))


def test_rc_not_trivially_zero_and_frozen():
    torch.manual_seed(0)
    profiles = torch.rand(300, 120) * torch.linspace(0, 3, 120)
    extractor = pretrain_extractor(profiles, dim=16, steps=60)
    assert all(not p.requires_grad for p in extractor.parameters())
    pred = torch.rand(32, 120, requires_grad=True)
    rc = representation_consistency(extractor, pred, profiles[:32])
    assert rc.item() > 1e-3  # different inputs → positive loss (no collapse to a constant)
    rc.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    same = representation_consistency(extractor, profiles[:32], profiles[:32])
    assert float(same) < 1e-4
    # representations of distinct profiles differ (the extractor is not a constant map)
    z = extractor(profiles[:64])
    assert float(z.std(dim=0).mean()) > 1e-3


def test_ablation_presets():
    assert LossConfig.preset("rmse").lambda_rc == 0 and LossConfig.preset("rmse").lambda_kl == 0
    assert LossConfig.preset("no_rc").lambda_rc == 0 and LossConfig.preset("no_rc").lambda_kl > 0
    assert LossConfig.preset("full").lambda_rc > 0
    with pytest.raises(ValueError):
        LossConfig.preset("nope")


def test_csr_row_ids_by_hand():
    indptr = torch.tensor([0, 2, 2, 5])  # rows of 2, 0 and 3 non-zeros; slots 5, 6 unused
    assert csr_row_ids(indptr, 7).tolist() == [0, 0, 2, 2, 2, 3, 3]


def test_sparse_loss_by_hand():
    """One row, M = 3, target (0, 2, 0) as one non-zero: RMSE and KL from the formulas directly."""
    eps = 0.01
    h, w, b = torch.zeros(1, 1), torch.zeros(3, 1), torch.tensor([0.0, 1.0, -1.0])
    pred = torch.nn.functional.softplus(b)
    t = torch.tensor([0.0, 2.0, 0.0])
    loss, r, k = sparse_head_loss_reference(
        h, w, b, torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2.0]), lambda_kl=1.0, kl_eps=eps
    )
    q = (pred + eps) / (pred + eps).sum()
    p = (t + eps) / (t + eps).sum()
    assert float(r) == pytest.approx(float(torch.sqrt(((pred - t) ** 2).mean())), rel=1e-6)
    assert float(k) == pytest.approx(float((q * torch.log(q / p)).sum()), rel=1e-5)
    assert float(loss) == pytest.approx(float(r) + float(k), rel=1e-6)
