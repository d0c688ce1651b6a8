import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from spatialtranscriptformer.module._losses import (
    LOSSES,
    compute_loss,
    masked_mean_over_spots,
    masked_mse,
    pathway_aux_loss,
    pcc_loss,
    pearson_per_gene,
    poisson_nll,
    zinb_nll,
)


def _padded(seed=0, B=2, S=12, G=5):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, S, G, generator=g)
    target = torch.randn(B, S, G, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 8:] = False
    return pred, target, mask


def _numpy_pcc(pred, target, mask):
    rs = []
    for b in range(pred.shape[0]):
        m = mask[b].numpy()
        for g in range(pred.shape[2]):
            rs.append(stats.pearsonr(pred[b, m, g].double().numpy(), target[b, m, g].double().numpy())[0])
    return 1 - float(np.mean(rs))


def test_pcc_matches_scipy_over_real_spots_only():
    pred, target, mask = _padded()
    expected = _numpy_pcc(pred, target, mask)
    assert float(pcc_loss(pred, target, mask)) == pytest.approx(expected, abs=1e-5)
    # garbage in padded spots changes nothing
    pred2, target2 = pred.clone(), target.clone()
    pred2[1, 8:] = 1e6
    target2[1, 8:] = -3e5
    assert float(pcc_loss(pred2, target2, mask)) == pytest.approx(expected, abs=1e-5)


def test_pcc_perfect_anticorrelated_and_invariances():
    _, target, mask = _padded(1)
    assert float(pcc_loss(target, target, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(pcc_loss(-target, target, mask)) == pytest.approx(2.0, abs=1e-6)
    pred, _, _ = _padded(2)
    base = float(pcc_loss(pred, target, mask))
    assert float(pcc_loss(3.5 * pred + 7.0, target, mask)) == pytest.approx(base, abs=1e-5)
    assert float(pcc_loss(pred, 0.01 * target - 2.0, mask)) == pytest.approx(base, abs=1e-5)


def test_pcc_constant_gene_is_zero_correlation_without_nan():
    pred, target, mask = _padded(3)
    target[:, :, 0] = 4.2  # constant target gene
    pred = pred.clone().requires_grad_(True)
    with torch.no_grad():
        pred[:, :, 1] = 1.5  # constant predicted gene
    r = pearson_per_gene(pred, target, mask)
    assert torch.isfinite(r).all()
    assert torch.all(r[:, :2] == 0)
    loss = pcc_loss(pred, target, mask)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # the other genes still match scipy
    m = mask[0].numpy()
    ref = stats.pearsonr(pred[0, m, 2].detach().double().numpy(), target[0, m, 2].double().numpy())[0]
    assert float(r[0, 2].detach()) == pytest.approx(ref, abs=1e-5)


def test_pcc_two_dimensional_input_correlates_rows():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    ref = np.mean([stats.pearsonr(a[:, j].numpy(), b[:, j].numpy())[0] for j in range(3)])
    assert float(pcc_loss(a, b)) == pytest.approx(1 - ref, abs=1e-5)


def test_masked_mse_ignores_padding():
    pred, target, mask = _padded(5)
    expected = ((pred - target)[mask] ** 2).mean()
    pred[1, 8:] = 100.0
    assert float(masked_mse(pred, target, mask)) == pytest.approx(float(expected), rel=1e-6)


def test_zinb_reduces_to_negative_binomial_at_pi_zero():
    g = torch.Generator().manual_seed(6)
    mu = torch.rand(2, 10, 4, generator=g) * 8 + 0.2
    theta = torch.rand(2, 10, 4, generator=g) * 4 + 0.5
    y = torch.poisson(mu, generator=g)
    y[0, 0, 0] = 0.0
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mu) - torch.log(theta))
    expected = -nb.log_prob(y).mean()
    got = zinb_nll(y, mu, theta, torch.zeros_like(mu))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_zinb_with_inflation_matches_scipy_pmf_and_mask():
    mu = torch.tensor([[[2.0, 5.0], [0.5, 1.0], [9.0, 9.0]]])
    theta = torch.tensor([[[1.5, 0.7], [3.0, 2.0], [1.0, 1.0]]])
    pi = torch.tensor([[[0.3, 0.1], [0.6, 0.0], [0.5, 0.5]]])
    y = torch.tensor([[[0.0, 3.0], [0.0, 2.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, False]])
    lls = []
    for s in range(2):
        for gi in range(2):
            m, t, p, k = (float(v[0, s, gi]) for v in (mu, theta, pi, y))
            pmf = stats.nbinom.pmf(k, t, t / (t + m))
            lls.append(np.log(p * (k == 0) + (1 - p) * pmf))
    got = zinb_nll(y, mu, theta, pi, mask)
    assert float(got) == pytest.approx(-np.mean(lls), rel=1e-5)


def test_poisson_matches_torch_on_masked_entries():
    pred, _, mask = _padded(7)
    rate = F.softplus(pred)
    y = torch.poisson(torch.full_like(rate, 2.0))
    expected = F.poisson_nll_loss(rate[mask], y[mask], log_input=False, full=False)
    rate2 = rate.clone()
    rate2[1, 8:] = 1e4
    assert float(poisson_nll(rate2, y, mask)) == pytest.approx(float(expected), rel=1e-6)


def test_pathway_aux_loss_is_one_minus_pcc_over_spots():
    scores, targets, mask = _padded(8, G=4)
    assert float(pathway_aux_loss(scores, targets, mask)) == pytest.approx(
        _numpy_pcc(scores, targets, mask), abs=1e-5
    )


def test_compute_loss_combines_parts_and_ignores_padding():
    pred, y, mask = _padded(9)
    scores, pt, _ = _padded(10, G=3)
    out = {"expr": pred, "pathway_scores": scores}
    batch = {"y": y, "mask": mask, "pathway_targets": pt}
    total, parts = compute_loss(out, batch, loss="mse_pcc", pcc_weight=0.5, pathway_loss_weight=0.25)
    mse = float(masked_mse(pred, y, mask))
    pcc = float(pcc_loss(pred, y, mask))
    aux = float(pathway_aux_loss(scores, pt, mask))
    assert parts["mse"] == pytest.approx(mse) and parts["pcc"] == pytest.approx(pcc)
    assert parts["pathway"] == pytest.approx(aux)
    assert float(total) == pytest.approx(mse + 0.5 * pcc + 0.25 * aux, rel=1e-6)
    assert parts["total"] == pytest.approx(float(total))
    # padded targets are irrelevant
    y2 = y.clone()
    y2[1, 8:] = 55.0
    total2, _ = compute_loss(out, dict(batch, y=y2), loss="mse_pcc", pcc_weight=0.5, pathway_loss_weight=0.25)
    assert float(total2) == pytest.approx(float(total), rel=1e-6)


def test_compute_loss_slide_level_uses_masked_mean_target():
    _, y, mask = _padded(11)
    pred = torch.randn(2, y.shape[-1])
    total, parts = compute_loss({"expr": pred}, {"y": y, "mask": mask}, loss="mse")
    target = torch.stack([y[0].mean(0), y[1, :8].mean(0)])
    assert torch.allclose(masked_mean_over_spots(y, mask), target, atol=1e-6)
    assert float(total) == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_compute_loss_each_loss_is_finite_and_differentiable(loss):
    pred, _, mask = _padded(12)
    pred.requires_grad_(True)
    y = torch.poisson(torch.full_like(pred, 3.0))
    pos = F.softplus(pred)
    out = {"expr": pos, "rate": pos, "mu": pos, "theta": pos + 1.0, "pi": torch.sigmoid(pred)}
    total, parts = compute_loss(out, {"y": y, "mask": mask}, loss=loss)
    total.backward()
    assert np.isfinite(parts["total"]) and torch.isfinite(pred.grad).all()
    assert pred.grad[1, 8:].abs().sum() == 0  # padding receives no gradient


def test_compute_loss_errors():
    pred, y, mask = _padded(13)
    batch = {"y": y, "mask": mask}
    with pytest.raises(ValueError, match="valid losses"):
        compute_loss({"expr": pred}, batch, loss="huber")
    with pytest.raises(KeyError, match="mu"):
        compute_loss({"expr": pred}, batch, loss="zinb")
    with pytest.raises(KeyError, match="pathway_targets"):
        compute_loss({"expr": pred, "pathway_scores": pred}, batch, loss="mse", pathway_loss_weight=1.0)
    with pytest.raises(KeyError, match="pathway_scores"):
        compute_loss({"expr": pred}, dict(batch, pathway_targets=y), loss="mse", pathway_loss_weight=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        compute_loss({"expr": pred}, batch, loss="mse_pcc", pcc_weight=-1.0)
    with pytest.raises(ValueError, match="shape"):
        compute_loss({"expr": pred[:, :, :2]}, batch, loss="mse")


def test_stats_collapse_index_morans_i_and_rank_agreement():
    import anndata as ad
    import squidpy as sq

    from spatialtranscriptformer._stats import collapse_index, column_pearson, morans_i, rank_agreement

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 10, size=(150, 2))
    smooth, noise = np.sin(xy[:, 0]), rng.normal(size=150)
    v = np.c_[smooth, noise, np.full(150, 2.0), np.cos(xy[:, 1])]
    mi = morans_i(v, xy)
    # squidpy's estimator on squidpy's 6-nearest-neighbour graph
    a = ad.AnnData(v[:, [0, 1, 3]], obsm={"spatial": xy})
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)
    knn(a, n_neighs=6) if knn is not None else sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    ref = sq.gr.spatial_autocorr(a, mode="moran", n_perms=None, copy=True, show_progress_bar=False)
    np.testing.assert_allclose(mi[[0, 1, 3]], ref.loc[a.var_names, "I"].to_numpy(), rtol=1e-8)
    assert mi[2] == 0.0 and mi[0] > 0.5 and abs(mi[1]) < 0.1
    assert rank_agreement([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert np.isnan(rank_agreement([1, 2], [1, 2]))
    one_map = np.c_[smooth, 2 * smooth + 1, -smooth]
    assert collapse_index(one_map) == pytest.approx(1.0)
    assert collapse_index(np.c_[smooth, noise, rng.normal(size=150)]) < 0.2
    assert column_pearson(np.c_[np.ones(5), np.arange(5.0)], np.c_[np.arange(5.0), np.ones(5)]).tolist()[0] == 0.0
