"""GradNorm (Chen et al. 2018) as used by the 2 µm super-resolution plan: the method's update, its
direction on a multi-task problem where one task trains faster, and no NaN with raw Poisson counts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _two_task_run(*, easy: int | None, steps: int, seed: int = 0, noise: float = 1.0):
    """Two regression tasks on one shared layer; the ``easy`` one is noiseless, the other has noise.

    The easy task's loss falls to near zero; the hard one's plateaus at the noise level. ``easy=None``:
    two identical tasks (same targets, same head initialisation). Returns per step the GradNorm weights
    and the inverse training rates ``L_i / L_i(0)``.
    """
    from spatialtranscriptformer.module._gradnorm import GradNorm

    g = torch.Generator().manual_seed(seed)
    n, d = 256, 8
    x = torch.randn(n, d, generator=g)
    a, b = torch.randn(d, 1, generator=g), torch.randn(d, 1, generator=g)
    ys = [x @ a, x @ b]
    if easy is None:
        ys[1] = ys[0].clone()
    else:
        hard = 1 - easy
        ys[hard] = ys[hard] + noise * ys[hard].std() * torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    shared = torch.nn.Linear(d, 16)
    heads = torch.nn.ModuleList([torch.nn.Linear(16, 1) for _ in range(2)])
    if easy is None:
        heads[1].load_state_dict(heads[0].state_dict())
    opt = torch.optim.Adam([*shared.parameters(), *heads.parameters()], lr=1e-2)
    gn = GradNorm(2, alpha=1.5, lr=0.025)
    weights, rates = [], []
    for _ in range(steps):
        h = torch.relu(shared(x))
        losses = [((heads[i](h) - ys[i]) ** 2).mean() for i in range(2)]
        loss = gn.weighted(losses)
        gn.step(losses, shared.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append(gn.weights.detach().clone().numpy())
        rates.append((torch.stack([v.detach() for v in losses]) / gn.initial).numpy())
    return np.array(weights), np.array(rates)


@pytest.mark.parametrize("easy", [0, 1])
def test_faster_task_is_down_weighted(easy):
    weights, rates = _two_task_run(easy=easy, steps=120)
    hard = 1 - easy
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights.sum(1), 2.0, rtol=1e-5)
    # the easy task did train faster ...
    assert rates[-1, easy] < 0.5 * rates[-1, hard]
    # ... so its gradient-norm target, and its weight, went down relative to the hard task's
    assert weights[-1, easy] < 0.5 < 1.5 < weights[-1, hard]
    # the weights follow the rates, not the task index: both orders give the mirrored outcome
    assert np.all(weights[60:, easy] < weights[60:, hard])


def test_identical_tasks_keep_equal_weights():
    weights, rates = _two_task_run(easy=None, steps=60)
    np.testing.assert_allclose(rates[:, 0], rates[:, 1], rtol=1e-6)
    np.testing.assert_allclose(weights, 1.0, atol=1e-6)  # no drift on a schedule of its own


def test_gradnorm_step_follows_the_method():
    """One step by hand: targets G_avg * r_i^alpha, L1 loss, gradient on the weights only, renormalised."""
    from spatialtranscriptformer.module._gradnorm import GradNorm

    alpha = 1.5
    gn = GradNorm(2, alpha=alpha, lr=0.025)
    W = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    a, b = 3.0, 1.0  # L_0 = a * W_0, L_1 = b * W_1: gradient norms a and b

    def losses():
        return [a * W[0], b * W[1]]

    gl = gn.step(losses(), W)  # first call: L_i(0) recorded, r = (1, 1), target = mean(w_i G_i) = 2
    assert W.grad is None  # the network's parameters receive no gradient from GradNorm
    np.testing.assert_allclose(gn.initial.numpy(), [3.0, 1.0])
    assert float(gl) == pytest.approx(abs(3.0 - 2.0) + abs(1.0 - 2.0))
    w1 = gn.weights.detach().clone()
    # G_0 = 3 > target: w_0 goes down; G_1 = 1 < target: w_1 goes up; Adam's first step is lr * sign
    assert w1[0] < 1 < w1[1] and float(w1.sum()) == pytest.approx(2.0)
    np.testing.assert_allclose(w1.numpy(), [0.975, 1.025], atol=1e-5)

    with torch.no_grad():  # task 0 trained: its loss halved, task 1 unchanged
        W[0] = 0.5
    ratio = np.array([0.5, 1.0])
    r = ratio / ratio.mean()
    G = w1.numpy() * np.array([a, b])
    target = G.mean() * r**alpha
    gl = gn.step(losses(), W)
    assert float(gl) == pytest.approx(np.abs(G - target).sum(), rel=1e-5)
    np.testing.assert_allclose(gn.last_ratio.numpy(), r, rtol=1e-6)
    w2 = gn.weights.detach().numpy()
    assert float(w2.sum()) == pytest.approx(2.0) and np.all(np.sign(w2 - w1.numpy()) == -np.sign(G - target))


def test_gradnorm_balances_gradient_norms():
    from spatialtranscriptformer.module._gradnorm import GradNorm

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    gn = GradNorm(2, alpha=1.5, lr=0.025)
    x = torch.randn(16, 4)
    for _ in range(40):
        out = x @ w
        losses = [out[:, 0].pow(2).mean() * 100.0, out[:, 1].pow(2).mean()]  # task 0: 100x larger gradients
        gn.step(losses, w)
    weights = gn.weights.detach()
    assert weights.sum().item() == pytest.approx(2.0, abs=1e-5)
    assert weights[0] < weights[1]  # the task with the larger gradient is down-weighted
    with pytest.raises(ValueError, match="losses"):
        gn.step(losses[:1], w)


def test_gradnorm_refuses_negative_or_nan_losses():
    from spatialtranscriptformer.module._gradnorm import GradNorm

    W = torch.nn.Parameter(torch.ones(2))
    gn = GradNorm(2, names=["2 µm", "16 µm"])
    before = gn.weights.detach().clone()
    with pytest.raises(ValueError, match=r"16 µm: -3\.7.*exact likelihood"):
        gn.step([W[0] * 2.0, W[1] * -3.7], W)
    with pytest.raises(ValueError, match="2 µm: nan"):
        gn.step([W[0] * float("nan"), W[1]], W)
    with pytest.raises(ValueError, match="initial loss"):
        gn.step([W[0] * 0.0, W[1]], W)
    assert torch.equal(gn.weights.detach(), before) and torch.isnan(gn.initial).all()
    for bad in ({"n_tasks": 0}, {"n_tasks": 2, "alpha": -1.0}, {"n_tasks": 2, "lr": 0.0}):
        with pytest.raises(ValueError):
            GradNorm(**bad)


def test_exact_poisson_nll_is_positive_and_gradnorm_stays_finite_on_raw_counts():
    from scipy.stats import poisson

    from spatialtranscriptformer.module._superres import SuperResDecoder
    from spatialtranscriptformer.train._superres_plan import SuperResPlan

    torch.manual_seed(0)
    dec = SuperResDecoder(8, 3, grid=2, hidden=16, out_size=32)
    plan = SuperResPlan(dec, loss="poisson", gradnorm=True)
    rate = 0.3  # per 2 µm bin: about 19 counts per 16 µm bin, where λ - k log λ alone is about -37
    y = torch.poisson(torch.full((4, 3, 32, 32), rate))
    m = torch.ones(4, 32, 32)
    m[:, :, :5] = 0  # some bins off tissue
    y = y * m[:, None]
    out = torch.log(torch.full((4, 3, 32, 32), rate))
    losses = plan.scale_losses(out, y, m)
    assert all(float(v) > 0 for v in losses)
    # the 2 µm loss is the exact mean negative log-likelihood over tissue bins and genes
    k = y.permute(0, 2, 3, 1)[m.bool()].numpy()
    assert float(losses[0]) == pytest.approx(-poisson.logpmf(k, rate).mean(), rel=1e-5)
    # the 16 µm loss too, with sum-pooled counts and rates (64 tissue bins per pooled bin where full)
    k16 = y.reshape(4, 3, 4, 8, 4, 8).sum((3, 5))
    n16 = m.reshape(4, 4, 8, 4, 8).sum((2, 4))
    keep = (n16 >= 32)[:, None].expand_as(k16)
    lam16 = (rate * n16)[:, None].expand_as(k16)
    ref = -poisson.logpmf(k16[keep].numpy(), lam16[keep].numpy()).mean()
    assert float(losses[3]) == pytest.approx(ref, rel=1e-4)

    # a few training steps on raw counts: GradNorm's weights stay finite, positive, summing to 4
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
    tokens = torch.randn(4, 2, 2, 8)
    for _ in range(5):
        losses = plan.scale_losses(plan(tokens), y, m)
        loss = plan.gradnorm.weighted(losses)
        plan.gradnorm.step(losses, dec.shared_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = plan.gradnorm.weights.detach()
    assert torch.isfinite(w).all() and (w > 0).all() and float(w.sum()) == pytest.approx(4.0, rel=1e-5)
    assert torch.isfinite(plan.gradnorm.last_ratio).all() and (plan.gradnorm.initial > 0).all()
