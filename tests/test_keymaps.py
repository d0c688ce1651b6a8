"""transformers-format checkpoints (Phikon's ViTModel, Hibou's DINOv2 with registers) load into timm."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer.pp._keymaps import hf_dinov2_to_timm, hf_vit_to_timm
from spatialtranscriptformer.pp._registry import _BACKBONES, IMAGENET_MEAN, IMAGENET_STD

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2})  # 2x2 patch grid, 192-d
DINO = ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 2,
                                          "init_values": 1e-5})  # 2x2 grid, 4 registers


def _timm(arch, kw, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, num_classes=0, **kw).eval()
    with torch.no_grad():  # non-trivial values everywhere (biases, norms, layer scale start as constants)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _split_qkv(sd, i, out, dim):
    for param in ("weight", "bias"):
        w = sd[f"blocks.{i}.attn.qkv.{param}"]
        for j, name in enumerate(("query", "key", "value")):
            out[f"encoder.layer.{i}.attention.attention.{name}.{param}"] = w[j * dim:(j + 1) * dim].clone()


def _to_hf_vit(sd, depth, dim, prefix=""):
    """Independent inverse of the converter: timm ViT names -> transformers ViTModel names."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
           "pooler.dense.weight": torch.randn(dim, dim), "pooler.dense.bias": torch.randn(dim)}
    for i in range(depth):
        _split_qkv(sd, i, out, dim)
        for p in ("weight", "bias"):
            out[f"encoder.layer.{i}.attention.output.dense.{p}"] = sd[f"blocks.{i}.attn.proj.{p}"]
            out[f"encoder.layer.{i}.layernorm_before.{p}"] = sd[f"blocks.{i}.norm1.{p}"]
            out[f"encoder.layer.{i}.layernorm_after.{p}"] = sd[f"blocks.{i}.norm2.{p}"]
            out[f"encoder.layer.{i}.intermediate.dense.{p}"] = sd[f"blocks.{i}.mlp.fc1.{p}"]
            out[f"encoder.layer.{i}.output.dense.{p}"] = sd[f"blocks.{i}.mlp.fc2.{p}"]
    return {prefix + k: v.clone() for k, v in out.items()}


def _to_hf_dinov2(sd, depth, dim, cls_pos):
    """timm DINOv2-reg names -> transformers Dinov2WithRegisters names (class position split off again)."""
    out = {"embeddings.cls_token": sd["cls_token"] - cls_pos,
           "embeddings.position_embeddings": torch.cat([cls_pos, sd["pos_embed"]], dim=1),
           "embeddings.register_tokens": sd["reg_token"], "embeddings.mask_token": torch.zeros(1, dim),
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(depth):
        _split_qkv(sd, i, out, dim)
        out[f"encoder.layer.{i}.layer_scale1.lambda1"] = sd[f"blocks.{i}.ls1.gamma"]
        out[f"encoder.layer.{i}.layer_scale2.lambda1"] = sd[f"blocks.{i}.ls2.gamma"]
        for p in ("weight", "bias"):
            out[f"encoder.layer.{i}.attention.output.dense.{p}"] = sd[f"blocks.{i}.attn.proj.{p}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"encoder.layer.{i}.{name}.{p}"] = sd[f"blocks.{i}.{name}.{p}"]
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture
def register():
    names = []

    def _register(name, arch, kw, key_map, size):
        @stf.pp.register_backbone(name, arch=arch, dim=0, input_size=size, mpp=1.0, mean=IMAGENET_MEAN,
                                  std=IMAGENET_STD, license="test", citation="test", timm_kwargs=kw,
                                  pooling="cls", key_map=key_map)
        def _build(spec):
            return timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs)

        names.append(name)

    yield _register
    for n in names:
        _BACKBONES.pop(n, None)


def _tiles(size):
    return np.random.default_rng(3).integers(0, 255, (2, size, size, 3), dtype=np.uint8)


def _features(model, bb, x):
    with torch.inference_mode():
        return model.forward_features(bb.preprocess(x)).numpy()


@pytest.mark.parametrize("prefix", ["", "vit."])
def test_hf_vit_checkpoint_loads(tmp_path, register, prefix):
    src = _timm(*VIT)
    hf = _to_hf_vit(src.state_dict(), depth=2, dim=192, prefix=prefix)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    register("tiny_hf_vit", *VIT, partial(hf_vit_to_timm, grid_size=(2, 2)), 32)
    bb = stf.pp.get_backbone("tiny_hf_vit", weights=tmp_path)
    x = _tiles(32)
    ref = _features(src, bb, x)
    np.testing.assert_allclose(bb(x), ref[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_features(bb.model, bb, x), ref, rtol=1e-5, atol=1e-6)  # every token


def test_hf_dinov2_checkpoint_loads(tmp_path, register):
    src = _timm(*DINO)
    sd = src.state_dict()
    cls_pos = 0.3 * torch.randn(1, 1, 48)
    hf = _to_hf_dinov2(sd, depth=2, dim=48, cls_pos=cls_pos)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    register("tiny_hf_dino", *DINO, partial(hf_dinov2_to_timm, grid_size=(2, 2)), 28)
    bb = stf.pp.get_backbone("tiny_hf_dino", weights=tmp_path)
    loaded = bb.model.state_dict()
    assert loaded["reg_token"].shape == (1, 4, 48)
    torch.testing.assert_close(loaded["cls_token"], sd["cls_token"])  # class position folded back in
    x = _tiles(28)
    ref = _features(src, bb, x)
    np.testing.assert_allclose(bb(x), ref[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_features(bb.model, bb, x), ref, rtol=1e-5, atol=1e-5)


def test_converters_leave_timm_and_input_unchanged():
    sd = _timm(*VIT).state_dict()
    assert hf_vit_to_timm(sd) is sd
    assert hf_dinov2_to_timm(sd) is sd
    hf = _to_hf_vit(sd, depth=2, dim=192)
    keys = list(hf)
    out = hf_vit_to_timm(hf)
    assert list(hf) == keys  # input dict not modified
    assert set(out) == set(sd)  # pooler dropped, nothing else lost or added
    for k in sd:
        torch.testing.assert_close(out[k], sd[k])


def test_dinov2_position_grid_resampled():
    src = _timm(*DINO)
    hf = _to_hf_dinov2(src.state_dict(), depth=2, dim=48, cls_pos=torch.zeros(1, 1, 48))
    # a 3x3 checkpoint grid whose embedding is constant per channel resamples to the same constant
    const = torch.randn(1, 1, 48)
    hf["embeddings.position_embeddings"] = torch.cat([torch.zeros(1, 1, 48), const.expand(1, 9, 48)], dim=1)
    out = hf_dinov2_to_timm(hf, grid_size=(2, 2))
    assert out["pos_embed"].shape == (1, 4, 48)
    torch.testing.assert_close(out["pos_embed"], const.expand(1, 4, 48), rtol=1e-5, atol=1e-5)
    assert hf_dinov2_to_timm(hf)["pos_embed"].shape == (1, 9, 48)  # no grid given: left for the strict load


def test_wrong_checkpoint_raises_clear_error(tmp_path, register):
    register("tiny_hf_vit_bad", *VIT, hf_vit_to_timm, 32)
    hf = _to_hf_vit(_timm(*VIT).state_dict(), depth=2, dim=192)
    hf["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(100, 192)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"do not match backbone 'tiny_hf_vit_bad'.*blocks\.1\.mlp\.fc1\.weight"):
        stf.pp.get_backbone("tiny_hf_vit_bad", weights=tmp_path)

    hf = _to_hf_vit(_timm(*VIT).state_dict(), depth=2, dim=192)
    del hf["encoder.layer.0.attention.attention.value.weight"]
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.0\.attn\.qkv\.weight'\]"):
        stf.pp.get_backbone("tiny_hf_vit_bad", weights=tmp_path)

    hf = _to_hf_vit(_timm(*VIT).state_dict(), depth=2, dim=192)
    hf["encoder.layer.0.attention.attention.key.weight"] = torch.zeros(192, 10)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0.*incompatible shapes"):
        hf_vit_to_timm(hf)
