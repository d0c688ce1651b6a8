import numpy as np
import pytest
import torch

from spatialtranscriptformer.module._baselines import HE2RNA, AttentionMIL, TransMIL
from spatialtranscriptformer.module._registry import available_models, build_model
from spatialtranscriptformer.module._transmil import PPEG, NystromAttention, iterative_pinv, square_grid_index

F, G = 12, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny batched matmuls are ~100x slower with 2 OpenMP threads on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = {
    "he2rna": {"hidden": (32,), "ks": (1, 2, 5), "dropout": 0.1},
    "attention_mil": {"hidden": 32, "attention_dim": 16},
    "transmil": {"dim": 32, "heads": 4, "num_landmarks": 8},
}


def _batch(sizes, f=F, seed=0):
    """Pad slides of the given spot counts into (B, S, ...) tensors."""
    g = torch.Generator().manual_seed(seed)
    s = max(sizes)
    x = torch.zeros(len(sizes), s, f)
    coords = torch.zeros(len(sizes), s, 2)
    mask = torch.zeros(len(sizes), s, dtype=torch.bool)
    for b, n in enumerate(sizes):
        x[b, :n] = torch.randn(n, f, generator=g)
        coords[b, :n] = torch.rand(n, 2, generator=g) * 1000
        mask[b, :n] = True
    return x, coords, mask


def _model(name, loss="mse", level=None, **kw):
    torch.manual_seed(0)
    return build_model(name, F, G, level=level, loss=loss, **{**SMALL[name], **kw}).eval()


def test_registered():
    models = available_models()
    for name in ("he2rna", "attention_mil", "transmil"):
        assert name in models and models[name]


@pytest.mark.parametrize("loss", ["mse", "pcc", "mse_pcc", "poisson", "zinb"])
@pytest.mark.parametrize(
    ("name", "level"), [("he2rna", "spot"), ("attention_mil", "slide"), ("transmil", "slide")]
)
def test_output_contract(name, level, loss):
    m = _model(name, loss=loss, level=level)
    assert m.level == level
    x, c, mask = _batch([9, 5])
    out = m(x, c, mask)
    shape = (2, 9, G) if level == "spot" else (2, G)
    assert out["expr"].shape == shape
    assert torch.isfinite(out["expr"]).all()
    if loss == "poisson":
        assert torch.equal(out["rate"], out["expr"]) and (out["rate"] >= 0).all()
    if loss == "zinb":
        assert ((out["pi"] > 0) & (out["pi"] < 1)).all() and (out["theta"] > 0).all()
        torch.testing.assert_close(out["expr"], (1 - out["pi"]) * out["mu"])
    if name == "he2rna":
        assert out["expr_slide"].shape == (2, G)
        assert torch.isfinite(out["expr"][1, 5:]).all()  # padded rows stay finite (masked downstream)


def test_slide_only_models_refuse_spot_level():
    for name in ("attention_mil", "transmil"):
        with pytest.raises(ValueError, match="slide"):
            build_model(name, F, G, level="spot", loss="mse")
    with pytest.raises(ValueError, match="per-spot"):
        AttentionMIL(F, G, level="spot")
    with pytest.raises(ValueError, match="per-spot"):
        TransMIL(F, G, level="spot")
    with pytest.raises(ValueError, match="Unknown loss"):
        HE2RNA(F, G, loss="huber")
    with pytest.raises(ValueError, match="zinb"):
        HE2RNA(F, G, loss="zinb", level="slide")


@pytest.mark.parametrize(
    ("name", "level"),
    [("he2rna", "spot"), ("he2rna", "slide"), ("attention_mil", "slide"), ("transmil", "slide")],
)
def test_padding_invariance(name, level):
    m = _model(name, level=level)
    x, c, mask = _batch([13, 21, 4], seed=3)
    with torch.no_grad():
        batched = m(x, c, mask, return_attention=True)
        for b, n in enumerate([13, 21, 4]):
            alone = m(x[b : b + 1, :n], c[b : b + 1, :n], mask[b : b + 1, :n], return_attention=True)
            if level == "spot":
                torch.testing.assert_close(batched["expr"][b, :n], alone["expr"][0], atol=1e-5, rtol=0)
                torch.testing.assert_close(
                    batched["expr_slide"][b], alone["expr_slide"][0], atol=1e-5, rtol=0
                )
            else:
                torch.testing.assert_close(batched["expr"][b], alone["expr"][0], atol=1e-5, rtol=0)
            for ab, aa in zip(batched["attention"], alone["attention"], strict=True):
                torch.testing.assert_close(ab[b, ..., :n], aa[0], atol=1e-5, rtol=0)
                assert (ab[b, ..., n:] == 0).all()
    # changing the padding values must not matter either
    x2 = x.clone()
    x2[~mask] = 100.0
    with torch.no_grad():
        again = m(x2, c, mask)
    key = "expr_slide" if level == "spot" else "expr"
    torch.testing.assert_close(again[key], batched[key], atol=1e-5, rtol=0)


def test_mil_attention_is_a_distribution_over_real_spots():
    m = _model("attention_mil")
    x, c, mask = _batch([6, 3])
    with torch.no_grad():
        a = m(x, c, mask, return_attention=True)["attention"][0]
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2))
    assert (a[1, 3:] == 0).all()


def test_he2rna_topk_mean():
    v = torch.tensor([[[1.0], [5.0], [3.0], [100.0]]])  # last row padded
    mask = torch.tensor([[True, True, True, False]])
    assert HE2RNA.topk_mean(v, mask, 1).item() == 5.0
    assert HE2RNA.topk_mean(v, mask, 2).item() == 4.0
    assert HE2RNA.topk_mean(v, mask, 50).item() == pytest.approx(3.0)  # k capped at the real spots
    m = HE2RNA(F, G, hidden=(8,), ks=(1, 3)).eval()
    x, c, mask = _batch([5])
    with torch.no_grad():
        out = m(x, c, mask)
    expect = (HE2RNA.topk_mean(out["expr"], mask, 1) + HE2RNA.topk_mean(out["expr"], mask, 3)) / 2
    torch.testing.assert_close(out["expr_slide"], expect)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 16, 17])
def test_ppeg_and_transmil_any_spot_count(n):
    idx, side = square_grid_index(n)
    assert side * side >= n > (side - 1) ** 2
    assert set(idx.tolist()) == set(range(n))
    ppeg = PPEG(8)
    tok = torch.randn(1, 1 + side * side, 8)
    out = ppeg(tok, side)
    assert out.shape == tok.shape
    torch.testing.assert_close(out[:, 0], tok[:, 0])  # class token passes through
    m = _model("transmil")
    x, c, mask = _batch([n])
    with torch.no_grad():
        o = m(x, c, mask)
    assert o["expr"].shape == (1, G) and torch.isfinite(o["expr"]).all()


def test_transmil_grid_order_follows_coordinates():
    m = _model("transmil")
    x, c, mask = _batch([10], seed=5)
    perm = torch.randperm(10)
    with torch.no_grad():
        a = m(x, c, mask)["expr"]
        b = m(x[:, perm], c[:, perm], mask)["expr"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # spot order is irrelevant with grid_order="coords"


def test_nystrom_equals_softmax_attention_when_landmarks_cover_tokens():
    torch.manual_seed(0)
    att = NystromAttention(
        16, heads=2, dim_head=8, num_landmarks=12, pinv_iterations=30, residual_kernel=0, dropout=0.0
    )
    x = torch.randn(1, 9, 16)  # 9 tokens < 12 landmarks: every landmark is one token (or padding)
    with torch.no_grad():
        out = att(x)
        q, k, v = att.to_qkv(x).view(1, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
        full = torch.softmax(q @ k.transpose(-1, -2) * att.scale, dim=-1) @ v
        ref = att.to_out(full.permute(0, 2, 1, 3).reshape(1, 9, 16))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_iterative_pinv():
    a = torch.softmax(torch.randn(3, 6, 6), dim=-1)
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-3, rtol=1e-3)


# --- planted signal ------------------------------------------------------------------------------
def _planted_slides(n_slides, seed, level):
    """Embeddings whose first G dims encode the expression (slide-level or per spot) plus noise."""
    rng = np.random.default_rng(seed)
    xs, cs, ys = [], [], []
    for _ in range(n_slides):
        n = int(rng.integers(6, 25))
        y_slide = rng.normal(size=G)
        y = y_slide + (rng.normal(size=(n, G)) if level == "spot" else 0.3 * rng.normal(size=(n, G)))
        x = rng.normal(size=(n, F))
        x[:, :G] += 1.5 * y
        xs.append(x)
        cs.append(rng.uniform(0, 2000, size=(n, 2)))
        ys.append(y)
    s = max(len(x) for x in xs)
    X = torch.zeros(n_slides, s, F)
    C = torch.zeros(n_slides, s, 2)
    Y = torch.zeros(n_slides, s, G)
    M = torch.zeros(n_slides, s, dtype=torch.bool)
    for b, (x, c, y) in enumerate(zip(xs, cs, ys, strict=True)):
        X[b, : len(x)], C[b, : len(x)], Y[b, : len(x)] = (
            torch.as_tensor(a, dtype=torch.float32) for a in (x, c, y)
        )
        M[b, : len(x)] = True
    return X, C, M, Y


def _slide_mean(Y, M):
    w = M[..., None].float()
    return (Y * w).sum(1) / w.sum(1)


def _pcc(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0) + 1e-12)).numpy()


@pytest.mark.parametrize(
    ("name", "level"),
    [("he2rna", "spot"), ("he2rna", "slide"), ("attention_mil", "slide"), ("transmil", "slide")],
)
def test_learns_planted_signal(name, level):
    torch.manual_seed(0)
    X, C, M, Y = _planted_slides(40, seed=1, level=level)
    Xt, Ct, Mt, Yt = _planted_slides(12, seed=2, level=level)
    m = build_model(name, F, G, level=level, loss="mse", **SMALL[name])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    target = Y if level == "spot" else _slide_mean(Y, M)
    m.train()
    for _ in range(40):
        idx = torch.randperm(40)[:8]
        out = m(X[idx], C[idx], M[idx])["expr"]
        if level == "spot":
            err = ((out - target[idx]) ** 2)[M[idx]]
        else:
            err = (out - target[idx]) ** 2
        loss = err.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        pred = m(Xt, Ct, Mt)["expr"]
    if level == "spot":
        r = _pcc(pred[Mt], Yt[Mt])
    else:
        r = _pcc(pred, _slide_mean(Yt, Mt))
    assert np.mean(r) > 0.6, r
