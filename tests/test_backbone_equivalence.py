"""Registered backbones compute what their publishers' model code computes.

- Phikon and Hibou-B are published in ``transformers`` format: a randomly initialised publisher-class model
  (``ViTModel`` / ``Dinov2WithRegistersModel`` with the published configuration, shrunk for speed) is saved
  in its own format, loaded through the registry, and both forwards are compared on the same preprocessed
  tiles. The full-size published configuration is checked as data (on the meta device: no weights).
- UNI, Virchow2, Prov-GigaPath and H-optimus-0 are timm models: the registry's build is compared with the
  publishers' ``timm.create_model`` call (full size, meta device), and the pooling with the model cards'
  embedding on small random models.
- CTransPath: a state dict in the layout of the published ``ctranspath.pth`` (names and shapes recorded in
  ``data/ctranspath_pth_layout.json``) loads strictly, every tensor where it belongs.

The published facts used here are quoted with their sources; ``docs/backbones.md`` lists them and the
measured differences. ``pytest tests/test_backbone_equivalence.py -s -k equivalence`` prints the figures.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer.pp._backbones import apply_key_map
from spatialtranscriptformer.pp._registry import _BACKBONES, get_spec

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

TOL = 1e-4  # max abs difference accepted between our embedding and the publisher's

# owkin/phikon config.json (main; last changed in commit ab6c3e6 "Update config.json", 2023-10-07):
# https://huggingface.co/owkin/phikon/blob/main/config.json. Model card: features are
# outputs.last_hidden_state[:, 0, :] of ViTModel.
PHIKON_CONFIG = {
    "attention_probs_dropout_prob": 0.0, "encoder_stride": 16, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "hidden_size": 768, "image_size": 224, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12,
    "patch_size": 16, "qkv_bias": True,
}
# histai/hibou-b config.json (commit 5cc6343 "Upload model"): https://huggingface.co/histai/hibou-b/blob/main/config.json
# (architectures ["Dinov2ModelWithRegisters"], custom code for transformers 4.41.2); the fields that define the
# network. The HistAI README / example notebook use pooler_output (the class token after the final LayerNorm).
HIBOU_CONFIG = {
    "apply_layernorm": True, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224, "initializer_range": 0.02,
    "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4, "num_attention_heads": 12,
    "num_channels": 3, "num_hidden_layers": 12, "num_register_tokens": 4, "patch_size": 14, "qkv_bias": True,
    "use_swiglu_ffn": True,
}

# timm-hosted models: the publishers' timm.create_model arguments.
# - UNI: mahmoodlab/UNI uni/get_encoder/get_encoder.py ('uni' preset) and the MahmoodLab/UNI model card
#   (timm.create_model("hf-hub:MahmoodLab/uni", pretrained=True, init_values=1e-5, dynamic_img_size=True)).
# - Virchow2: paige-ai/Virchow2 config.json "model_args" and the model card (mlp_layer=SwiGLUPacked,
#   act_layer=torch.nn.SiLU; embedding = cat(output[:, 0], output[:, 5:].mean(1)), "tokens 1-4 are registers").
# - Prov-GigaPath: prov-gigapath/prov-gigapath config.json "model_args" (patch_size 16 on vit_giant_patch14_dinov2),
#   global_pool "token"; demo/3_load_tile_encoder.py uses tile_encoder(x).
# - H-optimus-0: bioptimus/H-optimus-0 config.json (vit_giant_patch14_reg4_dinov2, input_size 224, fixed,
#   global_pool "token") and the model card (init_values=1e-5, dynamic_img_size=False); features = model(x).
PUBLISHED_TIMM = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                                      "dynamic_img_size": True}, False),
    "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
                                          "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True}, True),
    "gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                                              "depth": 40, "num_heads": 24, "init_values": 1e-05, "mlp_ratio": 5.33334,
                                              "num_classes": 0, "global_pool": "token"}, False),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False,
                                                      "num_classes": 0, "global_pool": "token"}, False),
}

FIGURES: dict[str, float] = {}


def _report(name: str, diff: float) -> None:
    FIGURES[name] = diff
    print(f"\nequivalence {name}: max abs difference {diff:.3g}")


@pytest.fixture
def tiny_spec():
    """Register a shrunk copy of a registered backbone: same build function and key map, smaller timm kwargs."""
    added = []

    def make(name: str, input_size: int, **overrides):
        spec = get_spec(name)
        tiny = dataclasses.replace(spec, name=f"tiny_{name}", input_size=input_size,
                                   timm_kwargs={**spec.timm_kwargs, **overrides})
        _BACKBONES[tiny.name] = tiny
        added.append(tiny.name)
        return tiny

    yield make
    for n in added:
        _BACKBONES.pop(n, None)


def _tiles(size: int, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _perturb(module, scale: float = 0.05, seed: int = 0) -> None:
    """Non-trivial values everywhere (LayerNorm weights, biases and layer scales start as constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _meta_shapes(sd) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _layer_norm_eps(model) -> set[float]:
    return {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}


def _published_state_dict(hf) -> dict:
    """The state dict in the names the publishers' files use (``transformers`` 4.x module names).

    ``transformers`` >= 5 renames modules in memory (``layers.0.attention.q_proj``) and writes the original
    names back on ``save_pretrained``; this applies the same reversal, so it works on the meta device too.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: the module names are the published ones
        return hf.state_dict()
    return revert_weight_conversion(hf, hf.state_dict())


# ------------------------------------------------------------------------------------------------ Phikon


def _phikon_hf(scale: float):
    transformers = pytest.importorskip("transformers", reason="the [test] extra installs transformers")
    config = transformers.ViTConfig(**{**PHIKON_CONFIG, "hidden_size": 48, "num_hidden_layers": 2,
                                       "num_attention_heads": 3, "intermediate_size": 96, "image_size": 32})
    torch.manual_seed(0)
    hf = transformers.ViTModel(config).eval()
    _perturb(hf)
    if scale != 1.0:  # tiny activations: the first LayerNorm's input variance is ~1e-10, far below 1e-6
        with torch.no_grad():
            for p in (hf.embeddings.cls_token, hf.embeddings.position_embeddings,
                      *hf.embeddings.patch_embeddings.projection.parameters()):
                p.mul_(scale)
    return hf


@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_phikon_equivalence_with_transformers_vitmodel(tmp_path, tiny_spec, fmt, scale):
    hf = _phikon_hf(scale)
    if fmt == "model.safetensors":
        hf.save_pretrained(tmp_path)  # the publisher's format (safetensors)
    else:
        torch.save(_published_state_dict(hf), tmp_path / fmt)  # what save_pretrained(safe_serialization=False) wrote
    assert (tmp_path / fmt).is_file()
    tiny_spec("phikon", 32, img_size=32, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
    bb = stf.pp.get_backbone("tiny_phikon", weights=tmp_path)
    x = _tiles(32)
    with torch.inference_mode():
        out = hf(pixel_values=bb.preprocess(x)).last_hidden_state
        ours = bb.model.forward_features(bb.preprocess(x))
    diff = float(np.abs(bb(x) - out[:, 0].numpy()).max())
    _report(f"phikon ({fmt}, activation scale {scale:g})", diff)
    assert diff < TOL
    np.testing.assert_allclose(ours.numpy(), out.numpy(), atol=TOL, rtol=0)  # every token, not just the class token

    if scale != 1.0:  # the check is sensitive to the LayerNorm epsilon: timm's default 1e-6 would fail it
        wrong = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                  embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0).eval()
        wrong.load_state_dict(bb.model.state_dict())
        with torch.inference_mode():
            off = float((wrong.forward_features(bb.preprocess(x))[:, 0] - out[:, 0]).abs().max())
        _report(f"phikon built with timm's default eps 1e-6 (control, {fmt}, activation scale {scale:g})", off)
        assert off > 100 * TOL


def test_phikon_full_config_matches_published_vitmodel():
    transformers = pytest.importorskip("transformers", reason="the [test] extra installs transformers")
    spec = get_spec("phikon")
    with torch.device("meta"):
        hf = transformers.ViTModel(transformers.ViTConfig(**PHIKON_CONFIG))
        model = spec.build(spec)
    converted = apply_key_map(spec.key_map, _published_state_dict(hf), model)
    assert _meta_shapes(converted) == _meta_shapes(model.state_dict())  # every tensor, same name and shape
    assert _layer_norm_eps(model) == _layer_norm_eps(hf) == {PHIKON_CONFIG["layer_norm_eps"]}
    assert model.patch_embed.patch_size == (16, 16) and model.patch_embed.img_size == (224, 224)
    assert model.blocks[0].attn.num_heads == PHIKON_CONFIG["num_attention_heads"]
    assert len(model.blocks) == PHIKON_CONFIG["num_hidden_layers"]
    act = model.blocks[0].mlp.act
    assert isinstance(act, torch.nn.GELU) and act.approximate == "none"  # "gelu" in transformers is exact GELU
    assert spec.pooling == "cls" and spec.dim == PHIKON_CONFIG["hidden_size"]


# ------------------------------------------------------------------------------------------------ Hibou-B


def _hibou_config(**overrides):
    transformers = pytest.importorskip("transformers", reason="the [test] extra installs transformers")
    return transformers, transformers.Dinov2WithRegistersConfig(**{**HIBOU_CONFIG, **overrides})


def test_hibou_equivalence_with_transformers_dinov2_with_registers(tmp_path, tiny_spec):
    transformers, config = _hibou_config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=28)
    torch.manual_seed(0)
    hf = transformers.Dinov2WithRegistersModel(config).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    keys = set(_published_state_dict(hf))
    assert {"embeddings.register_tokens", "encoder.layer.0.mlp.weights_in.weight"} <= keys  # the published names
    tiny_spec("hibou_b", 28, img_size=28, embed_dim=48, depth=2, num_heads=3)
    bb = stf.pp.get_backbone("tiny_hibou_b", weights=tmp_path)
    x = _tiles(28)
    with torch.inference_mode():
        out = hf(pixel_values=bb.preprocess(x))
        ours = bb.model.forward_features(bb.preprocess(x))
    diff = float(np.abs(bb(x) - out.pooler_output.numpy()).max())
    _report("hibou_b", diff)
    assert diff < TOL
    # token order [CLS, 4 registers, patches] and every token equal (registers included)
    np.testing.assert_allclose(ours.numpy(), out.last_hidden_state.numpy(), atol=TOL, rtol=0)


def test_hibou_full_config_matches_published_dinov2_with_registers():
    transformers, config = _hibou_config()
    spec = get_spec("hibou_b")
    with torch.device("meta"):
        hf = transformers.Dinov2WithRegistersModel(config)
        model = spec.build(spec)
    converted = apply_key_map(spec.key_map, _published_state_dict(hf), model)
    assert _meta_shapes(converted) == _meta_shapes(model.state_dict())
    assert _layer_norm_eps(model) == {HIBOU_CONFIG["layer_norm_eps"]}
    assert model.num_prefix_tokens == 1 + HIBOU_CONFIG["num_register_tokens"]
    assert model.blocks[0].mlp.fc1.out_features == 2 * 2048 and isinstance(model.blocks[0].mlp.act, torch.nn.SiLU)
    assert model.patch_embed.patch_size == (14, 14) and model.patch_embed.img_size == (224, 224)
    assert spec.pooling == "cls" and spec.dim == HIBOU_CONFIG["hidden_size"]


# ------------------------------------------------------------------------------------------------ timm-hosted


def _publisher_timm(name: str, **overrides):
    arch, kwargs, swiglu = PUBLISHED_TIMM[name]
    extra = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU} if swiglu else {}
    return timm.create_model(arch, pretrained=False, **{**kwargs, **overrides}, **extra)


def _structure(model) -> dict:
    blk = model.blocks[0]
    return {"shapes": _meta_shapes(model.state_dict()), "eps": _layer_norm_eps(model),
            "mlp": type(blk.mlp).__name__, "act": type(blk.mlp.act).__name__, "heads": blk.attn.num_heads,
            "prefix": model.num_prefix_tokens, "no_embed_class": model.no_embed_class,
            "dynamic": model.dynamic_img_size, "patch": model.patch_embed.patch_size, "img": model.patch_embed.img_size,
            "gate_last": getattr(blk.mlp, "gate_last", None)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TIMM))
def test_timm_backbone_matches_published_configuration(name):
    spec = get_spec(name)
    with torch.device("meta"):
        ours = spec.build(spec)
        theirs = _publisher_timm(name)
    assert _structure(ours) == _structure(theirs)
    assert spec.arch == PUBLISHED_TIMM[name][0]
    assert spec.dim == (2 * ours.num_features if spec.pooling == "cls+mean" else ours.num_features)


TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TIMM))
def test_timm_backbone_pooling_equivalence(tmp_path, tiny_spec, name):
    size = 32 if PUBLISHED_TIMM[name][1].get("patch_size", 14) == 16 else 28
    torch.manual_seed(0)
    pub = _publisher_timm(name, img_size=size, **TINY).eval()
    _perturb(pub)
    torch.save(pub.state_dict(), tmp_path / "pytorch_model.bin")
    spec = tiny_spec(name, size, img_size=size, **TINY)
    bb = stf.pp.get_backbone(spec.name, weights=tmp_path / "pytorch_model.bin")
    x = _tiles(size)
    with torch.inference_mode():
        out = pub(bb.preprocess(x))  # the model cards' forward
    if name == "virchow2":  # card: class token (+) mean of the patch tokens; tokens 1-4 are registers
        assert out.ndim == 3 and pub.num_prefix_tokens == 5
        ref = torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
        with_registers = torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1)
        assert float((torch.as_tensor(bb(x)) - with_registers).abs().max()) > 100 * TOL  # the registers matter
    else:  # global_pool "token": the class token after the final norm
        ref = out
    diff = float(np.abs(bb(x) - ref.numpy()).max())
    _report(name, diff)
    width = TINY["embed_dim"] * (2 if spec.pooling == "cls+mean" else 1)
    assert bb(x).shape == (3, width) and diff < TOL


# ------------------------------------------------------------------------------------------------ CTransPath

LAYOUT = Path(__file__).parent / "data" / "ctranspath_pth_layout.json"


def _transpath_state_dict(seed: int = 0) -> dict:
    layout = json.loads(LAYOUT.read_text())["layout"]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("relative_position_index"):
            sd[k] = torch.randint(0, 169, shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g)
    return sd


def test_ctranspath_loads_published_checkpoint_layout(tmp_path):
    sd = _transpath_state_dict()
    assert "layers.0.downsample.reduction.weight" in sd and "patch_embed.proj.6.bias" in sd  # TransPath's layout
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": sd}, path)  # as published: the state dict under "model"
    bb = stf.pp.get_backbone("ctranspath", weights=path)  # strict: every key and shape must match
    own = bb.model.state_dict()
    for k, v in own.items():
        src = k
        if ".downsample." in k:  # timm >= 0.9 opens stage i + 1 with the merge that closed stage i
            i = int(k.split(".")[1])
            src = k.replace(f"layers.{i}.", f"layers.{i - 1}.", 1)
        torch.testing.assert_close(v, sd[src], rtol=0, atol=0)
    dropped = set(sd) - {k for k in sd if not k.endswith((".relative_position_index", ".attn_mask"))}
    assert len(dropped) == 12 + 5  # the window buffers the model recomputes (12 index tables, 5 shifted masks)
    emb = bb(_tiles(224, n=2))
    assert emb.shape == (2, 768) and np.isfinite(emb).all()


def test_ctranspath_current_layout_passes_through(tmp_path):
    bb = stf.pp.get_backbone("ctranspath", weights="random")
    sd = bb.model.state_dict()
    assert get_spec("ctranspath").key_map(sd) is sd  # already timm >= 0.9 names: unchanged
    torch.save(sd, tmp_path / "ctranspath.pth")
    again = stf.pp.get_backbone("ctranspath", weights=tmp_path)
    x = _tiles(224, n=1)
    np.testing.assert_array_equal(again(x), bb(x))
