"""Training-memory savers of the transformer layer: exact gradients, less saved activation memory."""

import pytest
import torch
import torch.nn.functional as F

from spatialtranscriptformer.module._attention import QuadrantEncoderLayer, gelu_linear, norm_linear
from spatialtranscriptformer.module._stf import SpatialTranscriptFormer


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    fn().pow(2).sum().backward()
    return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]  # None: unused here


def test_fused_ops_match_plain_autograd():
    torch.manual_seed(0)
    ln, lin1, lin2 = torch.nn.LayerNorm(8).double(), torch.nn.Linear(8, 32).double(), torch.nn.Linear(32, 8).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    params = [x, ln.weight, ln.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias]
    fused = _grads(lambda: gelu_linear(norm_linear(x, ln, lin1), lin2), params)
    plain = _grads(lambda: lin2(F.gelu(lin1(ln(x)))), params)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x: gelu_linear(norm_linear(x, ln, lin1), lin2), (x,))
    with torch.no_grad():  # inference: the plain modules
        torch.testing.assert_close(gelu_linear(norm_linear(x, ln, lin1), lin2), lin2(F.gelu(lin1(ln(x)))))


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _plain_layer(layer, x, mask):
    a, _ = layer.attn(layer.norm1(x), 3, mask)
    x = x + a
    return x + layer.ffn(layer.norm2(x))


def test_layer_keeps_less_activation_memory_and_checkpointing_less_again():
    torch.manual_seed(0)
    layer = QuadrantEncoderLayer(32, 4, dropout=0.0).train()
    x = torch.randn(1, 403, 32, requires_grad=True)
    mask = torch.ones(1, 400, dtype=torch.bool)
    plain = _saved_bytes(lambda: _plain_layer(layer, x, mask))
    fused = _saved_bytes(lambda: layer(x, 3, mask)[0])
    layer.activation_checkpointing = True
    ckpt = _saved_bytes(lambda: layer(x, 3, mask)[0])
    assert fused <= 0.75 * plain
    assert ckpt <= 0.25 * fused
    torch.testing.assert_close(layer(x, 3, mask)[0], _plain_layer(layer, x, mask))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(dropout):
    torch.manual_seed(0)
    kw = dict(token_dim=32, n_heads=4, n_layers=2, num_pathways=5, dropout=dropout)
    a = SpatialTranscriptFormer(12, 7, **kw).train()
    b = SpatialTranscriptFormer(12, 7, activation_checkpointing=True, **kw).train()
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(2, 30, 12), torch.rand(2, 30, 2) * 500
    m = torch.ones(2, 30, dtype=torch.bool)
    m[1, 20:] = False
    outs = []
    for model in (a, b):
        torch.manual_seed(1)  # same dropout masks
        out = model(x, c, m)["expr"]
        out.pow(2).mean().backward()
        # parameters outside the expression path (e.g. a pathway read-out) get no gradient: kept as None
        outs.append((out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert sum(g is not None for g in outs[0][1]) > 0
    for ga, gb in zip(outs[0][1], outs[1][1], strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_training_step_on_cpu(monkeypatch):
    from spatialtranscriptformer.module import _attention

    torch.manual_seed(0)
    model = SpatialTranscriptFormer(12, 7, token_dim=32, n_heads=4, n_layers=2, num_pathways=5, dropout=0.0).train()
    x, c = torch.randn(1, 40, 12), torch.rand(1, 40, 2) * 500
    m = torch.ones(1, 40, dtype=torch.bool)
    params = list(model.parameters())

    def bf16_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, c, m)["expr"]
        return out.float()  # (the gene read-out may already return float32)

    fused = _grads(bf16_step, params)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in fused)
    fp32 = _grads(lambda: model(x, c, m)["expr"], params)
    flat = lambda gs: torch.cat([g.ravel() for g in gs])  # noqa: E731
    assert F.cosine_similarity(flat(fused), flat(fp32), 0) > 0.9
    assert not torch.equal(flat(fused), flat(fp32))  # autocast did run the matrix products in bfloat16
    # the memory-saving backward under autocast equals autograd's own backward of the plain ops
    monkeypatch.setattr(_attention, "norm_linear", lambda x, norm, lin: lin(norm(x)))
    monkeypatch.setattr(_attention, "gelu_linear", lambda h, lin: lin(F.gelu(h)))
    plain = _grads(bf16_step, params)
    assert F.cosine_similarity(flat(fused), flat(plain), 0) > 0.999
