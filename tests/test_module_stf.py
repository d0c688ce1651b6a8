import itertools
import math

import numpy as np
import pytest
import torch

from spatialtranscriptformer.module._attention import INTERACTIONS
from spatialtranscriptformer.module._losses import LOSSES, compute_loss
from spatialtranscriptformer.module._stf import SpatialTranscriptFormer

F_IN, G, P = 12, 6, 4
SUBSETS = [frozenset(c) for r in range(5) for c in itertools.combinations(INTERACTIONS, r)]


def _model(**kw):
    torch.manual_seed(0)
    kw = {"token_dim": 16, "n_heads": 2, "num_pathways": P, "dropout": 0.0, **kw}
    return SpatialTranscriptFormer(F_IN, G, **kw).eval()


def _slide(S, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, F_IN, generator=g), torch.rand(S, 2, generator=g) * 3000 + 500


def _batch(sizes, seed=0):
    """Pad slides of the given sizes into one batch (padding rows zero, mask False)."""
    S = max(sizes)
    x = torch.zeros(len(sizes), S, F_IN)
    c = torch.zeros(len(sizes), S, 2)
    m = torch.zeros(len(sizes), S, dtype=torch.bool)
    for i, n in enumerate(sizes):
        x[i, :n], c[i, :n] = _slide(n, seed + i)
        m[i, :n] = True
    return x, c, m


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("level", ["spot", "slide"])
def test_output_keys_and_shapes(loss, level):
    model = _model(loss=loss, level=level)
    x, c, m = _batch([9, 7])
    out = model(x, c, m)
    lead = (2, 9) if level == "spot" else (2,)
    extra = {"poisson": {"rate"}, "zinb": {"mu", "theta", "pi"}}.get(loss, set())
    assert set(out) == {"expr", "pathway_scores"} | extra
    assert out["expr"].shape == (*lead, G) and out["pathway_scores"].shape == (*lead, P)
    for k in extra:
        assert out[k].shape == out["expr"].shape
    if loss == "zinb":
        assert torch.allclose(out["expr"], (1 - out["pi"]) * out["mu"])
        assert (out["theta"] > 0).all() and ((out["pi"] > 0) & (out["pi"] < 1)).all()
    if loss == "poisson":
        assert (out["rate"] >= 0).all() and torch.equal(out["expr"], out["rate"])
    assert model.level == level


@pytest.mark.parametrize("level", ["spot", "slide"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"interactions": ("p2p", "p2h", "h2p"), "positional_encoding": "learned"},
        {"interactions": ("p2h", "h2h"), "loss": "zinb"},
    ],
)
def test_padding_never_changes_real_spots(level, kw):
    model = _model(level=level, **kw)
    alone = model(*_batch([7], seed=3))
    # the same slide (seed 3) batched first with a bigger slide -> padded to 11 spots
    x, c, m = _batch([7, 11], seed=3)
    x[0, 7:] = torch.randn(4, F_IN) * 50  # padding content must not matter either
    c[0, 7:] = 1e5
    padded = model(x, c, m)
    for key in alone:
        a, b = alone[key][0], padded[key][0]
        if level == "spot":
            b = b[:7]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interactions", SUBSETS, ids=lambda s: "-".join(sorted(s)) or "self")
def test_fast_path_matches_explicit_attention(interactions):
    model = _model(interactions=interactions, n_layers=2)
    x, c, m = _batch([10, 6], seed=5)
    fast = model(x, c, m)
    slow = model(x, c, m, return_attention=True)
    torch.testing.assert_close(fast["expr"][m], slow["expr"][m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast["pathway_scores"][m], slow["pathway_scores"][m], atol=1e-5, rtol=1e-5)
    maps = slow["attention"]
    assert len(maps) == 2
    T = P + 10
    for a in maps:
        assert a.shape == (2, 2, T, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, T))
        quad = {"p2p": a[..., :P, :P], "p2h": a[..., :P, P:], "h2p": a[..., P:, :P], "h2h": a[..., P:, P:]}
        for name, block in quad.items():
            off_diag = (
                block - torch.diag_embed(torch.diagonal(block, dim1=-2, dim2=-1))
                if name in ("p2p", "h2h")
                else block
            )
            if name not in interactions:
                assert off_diag.abs().max() == 0, name
        # a token always sees itself; padded keys are never attended by real tokens
        assert (torch.diagonal(a, dim1=-2, dim2=-1)[..., : P + 6] > 0).all()
        assert a[1][:, : P + 6, P + 6 :].abs().max() == 0


def test_fast_path_never_builds_a_quadratic_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    S = 400
    x, c, m = _batch([S, S - 50], seed=1)
    for inter in (INTERACTIONS, ("p2p", "p2h", "h2p"), ("p2h", "h2h")):
        model = _model(interactions=inter)
        Largest.numel = 0
        with Largest():
            model(x, c, m)["expr"].sum()
        assert Largest.numel < S * S, (inter, Largest.numel)
    Largest.numel = 0
    with Largest():
        _model()(x, c, m, return_attention=True)
    assert Largest.numel >= 2 * (S + P) ** 2  # the explicit path does (and is detected)


def test_residual_dropout_keeps_expectation_and_saves_a_bool_mask():
    from spatialtranscriptformer.module._attention import residual_dropout

    torch.manual_seed(0)
    x = torch.ones(20_000, requires_grad=True)
    assert residual_dropout(x, 0.1, False) is x
    y = residual_dropout(x, 0.1, True)
    vals = set(np.round(y.detach().unique().double().numpy(), 5).tolist())
    assert vals == {0.0, round(1 / 0.9, 5)}
    assert abs(float((y == 0).float().mean()) - 0.1) < 0.01
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows only through kept entries


def test_interaction_validation():
    with pytest.raises(ValueError, match="n_layers >= 2"):
        _model(interactions=("p2p", "p2h", "h2p"), n_layers=1)
    with pytest.raises(ValueError, match=r"valid interactions are \['p2p', 'p2h', 'h2p', 'h2h'\]"):
        _model(interactions=("p2p", "x2y"))
    assert _model(interactions="all").interactions == frozenset(INTERACTIONS)
    assert _model(interactions=("h2h",), n_layers=1).interactions == {"h2h"}


def test_constructor_errors():
    memb = np.zeros((G, P))
    with pytest.raises(ValueError, match="needs pathway_membership"):
        _model(pathway_init=True)
    with pytest.raises(ValueError, match="6 rows"):
        _model(pathway_membership=np.ones((G + 1, P)))
    with pytest.raises(ValueError, match="0/1"):
        _model(pathway_membership=memb + 0.5)
    with pytest.raises(ValueError, match="disagrees"):
        _model(pathway_membership=memb, num_pathways=P + 1)
    with pytest.raises(ValueError, match="gene_means"):
        _model(gene_means=np.ones(G + 2))
    with pytest.raises(ValueError, match="valid losses"):
        _model(loss="l1")
    with pytest.raises(ValueError, match="valid levels"):
        _model(level="patch")
    with pytest.raises(ValueError, match="positional_encoding"):
        _model(positional_encoding="rope")
    with pytest.raises(ValueError, match="divisible"):
        _model(token_dim=18, n_heads=4)
    model = _model()
    x, c, m = _batch([5])
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[..., :3], c, m)
    with pytest.raises(ValueError, match="coords"):
        model(x, c[..., :1], m)


def test_pathway_init_and_gene_means():
    rng = np.random.default_rng(0)
    memb = (rng.random((G, P)) < 0.5).astype(float)
    memb[0, :] = 1  # every pathway has >= 1 member
    means = rng.random(G) * 3 + 0.5
    model = _model(pathway_membership=memb, pathway_init=True, gene_means=means, gene_head="pathways")
    expected = memb / memb.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(model.reconstructor.weight.detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(model.reconstructor.bias.detach().numpy(), means, rtol=1e-6)
    assert model.num_pathways == P
    # count models: the bias is the inverse softplus of the means, so zero scores predict the means
    pois = _model(pathway_membership=memb, gene_means=means, loss="poisson", gene_head="pathways")
    np.testing.assert_allclose(
        torch.nn.functional.softplus(pois.reconstructor.bias).detach().numpy(), means, rtol=1e-5
    )
    # membership without pathway_init leaves the default init
    assert not np.allclose(_model(pathway_membership=memb).reconstructor.weight.detach().numpy(), expected)
    # a pathway without a member among the predicted genes (e.g. most Hallmarks for 50 genes) starts at zero
    part = memb.copy()
    part[:, 1] = 0
    w = _model(pathway_membership=part, pathway_init=True, gene_head="both").reconstructor.weight.detach().numpy()
    assert np.all(w[:, 1] == 0) and np.allclose(w[:, 0], part[:, 0] / part[:, 0].sum())
    with pytest.raises(ValueError, match="gene_head='token' does not use"):
        _model(pathway_membership=memb, pathway_init=True)


@pytest.mark.parametrize("head", ["pathways", "token", "both"])
def test_gene_heads(head):
    model = _model(gene_head=head).train()
    x, c, m = _batch([8, 5])
    out = model(x, c, m)
    assert out["expr"].shape == (2, 8, G) and out["pathway_scores"].shape == (2, 8, P)
    total, _ = compute_loss(out, {"y": torch.randn(2, 8, G), "mask": m}, loss="mse")
    total.backward()
    used = {"pathways": ("reconstructor",), "token": ("token_head",), "both": ("reconstructor", "token_head")}[head]
    for name in used:
        assert getattr(model, name).weight.grad.abs().sum() > 0
    if head == "token":  # genes do not depend on the pathway scores; the reconstructor gets no gradient
        assert model.reconstructor.weight.grad is None
    else:
        assert not hasattr(model, "token_head") if head == "pathways" else True
    with pytest.raises(ValueError, match="gene_head"):
        _model(gene_head="tokens")


def test_temperature_init_clamp_and_gradients():
    model = _model(gene_head="pathways").train()
    assert float(model.temperature.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    x, c, m = _batch([8, 5])
    y = torch.randn(2, 8, G)
    total, _ = compute_loss(model(x, c, m), {"y": y, "mask": m}, loss="mse")
    total.backward()
    assert model.pathway_tokens.grad is not None and model.pathway_tokens.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    assert model.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.temperature.detach()) == pytest.approx(100.0)
    scores = model.eval()(x, c, m)["pathway_scores"]
    assert scores.abs().max() <= 100.0 + 1e-3


@pytest.mark.parametrize("pe", ["sinusoidal", "learned"])
def test_translation_invariance_and_position_dependence(pe):
    model = _model(positional_encoding=pe)
    x, c, m = _batch([9, 6])
    out = model(x, c, m)["expr"]
    shifted = model(x, c + torch.tensor([1234.5, -800.0]), m)["expr"]
    torch.testing.assert_close(shifted[m], out[m], atol=1e-4, rtol=1e-4)
    moved = c.clone()
    moved[0, 0] += torch.tensor([300.0, 0.0])
    assert not torch.allclose(model(x, moved, m)["expr"][0], out[0], atol=1e-4)
    # without encoding, positions are ignored entirely
    nope = _model(positional_encoding="none")
    torch.testing.assert_close(nope(x, moved, m)["expr"][m], nope(x, c, m)["expr"][m])


def test_sinusoidal_wavelengths_span_requested_range():
    from spatialtranscriptformer.module._encoding import SinusoidalEncoding2D

    enc = SinusoidalEncoding2D(16, wavelengths_um=(50.0, 5000.0))
    wl = 2 * math.pi / enc.freqs
    assert float(wl.min()) == pytest.approx(50.0, rel=1e-5) and float(wl.max()) == pytest.approx(
        5000.0, rel=1e-5
    )
    pe = enc(torch.tensor([[[0.0, 0.0], [50.0, 0.0]]]), torch.ones(1, 2, dtype=torch.bool))
    # the x channels at the shortest wavelength repeat after one wavelength (50 µm); centroid shift cancels
    assert pe.shape == (1, 2, 16)
    torch.testing.assert_close(pe[0, 0, [0, 4]], pe[0, 1, [0, 4]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pe_wavelength_um"):
        SinusoidalEncoding2D(16, wavelengths_um=(0.0, 10.0))


@pytest.mark.slow
def test_dispatch_is_by_configuration_not_wrapper_type():
    """A wrapped / compiled module keeps the configured level (the published implementation did not)."""
    model = _model(level="spot")
    x, c, m = _batch([6, 4])
    ref = model(x, c, m)["expr"]

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return self.inner(*a, **k)

    torch.testing.assert_close(Wrapper(model)(x, c, m)["expr"], ref)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    out = compiled(x, c, m)
    assert out["expr"].shape == (2, 6, G)
    torch.testing.assert_close(out["expr"], ref, atol=1e-5, rtol=1e-5)
    _, parts = compute_loss(out, {"y": torch.zeros(2, 6, G), "mask": m}, loss="mse_pcc")
    assert {"mse", "pcc"} <= set(parts)


def test_registry_builds_stf():
    from spatialtranscriptformer.module._registry import build_model, get_model_entry

    entry = get_model_entry("stf")
    assert set(entry.levels) == {"spot", "slide"}
    model = build_model(
        "stf", F_IN, G, level="slide", loss="poisson", token_dim=16, n_heads=2, num_pathways=P
    )
    assert isinstance(model, SpatialTranscriptFormer)
    assert model.level == "slide" and model.loss == "poisson"
