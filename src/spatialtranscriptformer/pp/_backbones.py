"""Registered backbones and loading of their weights (Hugging Face cache or an explicit path).

Weights are never downloaded at run time and never silently replaced by random ones: a missing file
is a :class:`FileNotFoundError` that names the repository or file and how to provide it, and a
checkpoint whose keys or shapes do not match the architecture is a :class:`ValueError`.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ._keymaps import hf_dinov2_to_timm, hf_vit_to_timm, transpath_swin_to_timm
from ._registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, get_spec, register_backbone

RANDOM = "random"
"""``weights="random"``: explicit opt-in to random initialisation (tests, smoke runs)."""

# Where each registered architecture comes from (the facts are the publishers'; see docs/backbones.md for
# links and what the test suite verifies, tests/test_backbone_equivalence.py for the checks):
#
# name         publisher's model code / config                                    registry build
# ctranspath   TransPath ctran.py: timm 0.5.4 swin_tiny_patch4_window7_224 with    timm swin_tiny + ConvStem;
#              ConvStem; get_features_CTransPath.py loads ctranspath.pth["model"]  key map transpath_swin_to_timm
# phikon       owkin/phikon config.json: transformers ViTModel, hidden 768, 12       timm vit_base_patch16_224,
#              layers/heads, patch 16, image 224, layer_norm_eps 1e-12; card:       LayerNorm eps 1e-12;
#              last_hidden_state[:, 0]                                              key map hf_vit_to_timm
# uni          MahmoodLab/UNI get_encoder.py + card: vit_large_patch16_224,        same kwargs
#              img 224, patch 16, init_values 1e-5, dynamic_img_size; model(x) = CLS
# virchow2     paige-ai/Virchow2 config.json + card: vit_huge_patch14_224, img 224, same kwargs + SwiGLUPacked/SiLU
#              init_values 1e-5, mlp_ratio 5.3375, reg_tokens 4, dynamic_img_size,
#              SwiGLUPacked + SiLU; embedding = CLS (+) mean of tokens 5: (not the 4 registers)
# gigapath     prov-gigapath/prov-gigapath config.json: vit_giant_patch14_dinov2    same kwargs (patch 16!)
#              with img 224, patch 16, embed 1536, depth 40, heads 24,
#              init_values 1e-5, mlp_ratio 5.33334; model(x) = CLS
# hibou_b      histai/hibou-b config.json (custom Dinov2ModelWithRegisters,          timm vit_base_patch14_reg4_dinov2
#              trust_remote_code): hidden 768, 12 layers/heads, patch 14, image 224, + SwiGLUPacked (2 x 2048)/SiLU;
#              4 registers, use_swiglu_ffn, layer_norm_eps 1e-6; pooler_output = CLS key map hf_dinov2_to_timm
# h_optimus_0  bioptimus/H-optimus-0 config.json + card: vit_giant_patch14_reg4_dinov2, same kwargs
#              input 224 (fixed), init_values 1e-5, dynamic_img_size False; model(x) = CLS


def timm_model(spec: BackboneSpec, **extra: Any):
    """A weight-less timm model for ``spec`` (``num_classes=0``); ``extra`` adds non-JSON arguments (layers)."""
    import timm

    return timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs, **extra)


def _swiglu_kwargs() -> dict[str, Any]:
    """Arguments for timm's packed SwiGLU feed-forward: ``fc1`` -> ``[x1; x2]``, ``fc2(silu(x1) * x2)`` (Shazeer 2020)."""
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _dinov2_swiglu_ratio(dim: int, mlp_ratio: float = 4.0) -> float:
    """``mlp_ratio`` giving timm's ``SwiGLUPacked`` the widths of DINOv2's SwiGLU feed-forward.

    DINOv2 (and ``transformers`` ``Dinov2SwiGLUFFN``) use a hidden width of
    ``(int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8`` (768 -> 2048) and a first projection of twice
    that; timm's ``SwiGLUPacked`` takes the first projection's width as ``int(dim * mlp_ratio)``.
    """
    hidden = (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8
    ratio = (2 * hidden + 0.5) / dim  # +0.5: int(dim * ratio) must not round down to 2 * hidden - 1
    if int(dim * ratio) != 2 * hidden:  # pragma: no cover - arithmetic guard
        raise ValueError(f"Cannot express a SwiGLU width of {2 * hidden} for dim {dim} as a timm mlp_ratio.")
    return ratio


def _hf_vit_key_map(state_dict, model):
    return hf_vit_to_timm(state_dict, grid_size=model.patch_embed.grid_size)


def _hf_dinov2_key_map(state_dict, model):
    return hf_dinov2_to_timm(state_dict, grid_size=model.patch_embed.grid_size)


@register_backbone(
    "resnet50", arch="resnet50.tv_in1k", dim=2048, input_size=224, mpp=0.5, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="BSD-3-Clause (torchvision ImageNet weights)", pooling="avg",
    citation="He et al. 2016, Deep Residual Learning (ImageNet-1k weights)", hf_repo="timm/resnet50.tv_in1k",
)
def _resnet50(spec):
    return timm_model(spec)


@register_backbone(
    "resnet18", arch="resnet18.tv_in1k", dim=512, input_size=224, mpp=0.5, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="BSD-3-Clause (torchvision ImageNet weights)", pooling="avg",
    citation="He et al. 2016, Deep Residual Learning (ImageNet-1k weights)", hf_repo="timm/resnet18.tv_in1k",
)
def _resnet18(spec):
    return timm_model(spec)


@register_backbone(
    "ctranspath", arch="swin_tiny_patch4_window7_224", dim=768, input_size=224, mpp=1.0, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="GPL-3.0", pooling="avg", hf_repo=None, weight_files=("ctranspath.pth",),
    citation="Wang et al. 2022, Transformer-based unsupervised contrastive learning for histopathological image classification (Medical Image Analysis)",
    key_map=transpath_swin_to_timm,  # TransPath's ctranspath.pth: timm 0.5.4 Swin layout
)
def _ctranspath(spec):
    """Swin-T whose patch embedding is CTransPath's convolutional stem."""
    from ._ctranspath import ConvStem

    return timm_model(spec, embed_layer=ConvStem)


PHIKON_LAYER_NORM_EPS = 1e-12
"""``layer_norm_eps`` of ``owkin/phikon``'s ``config.json`` (the ``ViTModel`` the weights are published for)."""


@register_backbone(
    "phikon", arch="vit_base_patch16_224", dim=768, input_size=224, mpp=0.5, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="Owkin non-commercial licence (see the model card)", pooling="cls",
    hf_repo="owkin/phikon", citation="Filiot et al. 2023, Scaling self-supervised learning for histopathology with masked image modeling",
    timm_kwargs={"img_size": 224}, key_map=_hf_vit_key_map,  # transformers ViTModel checkpoint
)
def _phikon(spec):
    """ViT-B/16 with the LayerNorm epsilon of Phikon's published ``ViTModel`` config (1e-12, timm: 1e-6)."""
    import torch

    return timm_model(spec, norm_layer=partial(torch.nn.LayerNorm, eps=PHIKON_LAYER_NORM_EPS))


@register_backbone(
    "uni", arch="vit_large_patch16_224", dim=1024, input_size=224, mpp=0.5, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="CC-BY-NC-ND-4.0", pooling="cls", hf_repo="MahmoodLab/UNI",
    weight_files=("pytorch_model.bin",),
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    citation="Chen et al. 2024, Towards a general-purpose foundation model for computational pathology (Nature Medicine)",
)
def _uni(spec):
    return timm_model(spec)


@register_backbone(
    "virchow2", arch="vit_huge_patch14_224", dim=2560, input_size=224, mpp=0.5, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="CC-BY-NC-ND-4.0", pooling="cls+mean", hf_repo="paige-ai/Virchow2",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "dynamic_img_size": True},
    citation="Zimmermann et al. 2024, Virchow2: Scaling self-supervised mixed magnification models in pathology",
)
def _virchow2(spec):
    return timm_model(spec, **_swiglu_kwargs())


@register_backbone(
    "gigapath", arch="vit_giant_patch14_dinov2", dim=1536, input_size=224, mpp=0.5, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, license="Prov-GigaPath licence (see the model card)", pooling="cls",
    hf_repo="prov-gigapath/prov-gigapath",
    # the published config overrides the architecture's patch 14 with 16 (a 14 x 14 grid at 224 px)
    timm_kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "init_values": 1e-5, "mlp_ratio": 5.33334},
    citation="Xu et al. 2024, A whole-slide foundation model for digital pathology from real-world data (Nature)",
)
def _gigapath(spec):
    return timm_model(spec)


@register_backbone(
    "hibou_b", arch="vit_base_patch14_reg4_dinov2", dim=768, input_size=224, mpp=0.5,
    mean=(0.7068, 0.5755, 0.722), std=(0.195, 0.2316, 0.1816), license="Apache-2.0", pooling="cls",
    hf_repo="histai/hibou-b", timm_kwargs={"img_size": 224, "embed_dim": 768, "init_values": 1e-5},
    citation="Nechaev et al. 2024, Hibou: A family of foundational vision transformers for pathology",
    key_map=_hf_dinov2_key_map,  # transformers DINOv2-with-registers checkpoint (SwiGLU feed-forward)
)
def _hibou(spec):
    """DINOv2 ViT-B/14 with 4 registers and DINOv2's SwiGLU feed-forward (``use_swiglu_ffn`` in the config)."""
    ratio = _dinov2_swiglu_ratio(int(spec.timm_kwargs.get("embed_dim", 768)))
    return timm_model(spec, mlp_ratio=ratio, **_swiglu_kwargs())


@register_backbone(
    "h_optimus_0", arch="vit_giant_patch14_reg4_dinov2", dim=1536, input_size=224, mpp=0.5,
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), license="Apache-2.0",
    pooling="cls", hf_repo="bioptimus/H-optimus-0",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    citation="Saillard et al. 2024, H-optimus-0 (Bioptimus)",
)
def _hoptimus(spec):
    return timm_model(spec)


@register_backbone(
    "handcrafted", arch=None, dim=46, input_size=224, mpp=0.5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    license="BSD-3-Clause (this library; no weights)", pooling="features", needs_weights=False,
    citation="Ruifrok & Johnston 2001 (colour deconvolution); scikit-image",
)
def _handcrafted(spec):
    from ._handcrafted import HandcraftedFeatures

    return HandcraftedFeatures()


def find_weights(spec: BackboneSpec, weights: str | os.PathLike | None) -> Path:
    """Locate the weight file: an explicit path, else the local Hugging Face cache of ``spec.hf_repo``."""
    if weights is not None:
        p = Path(weights)
        if p.is_dir():
            hits = [p / f for f in spec.weight_files if (p / f).is_file()]
            if not hits:
                raise FileNotFoundError(f"No weight file {list(spec.weight_files)} in {p} for backbone {spec.name!r}.")
            return hits[0]
        if not p.is_file():
            raise FileNotFoundError(f"Weights file for backbone {spec.name!r} not found: {p}.")
        return p
    if spec.hf_repo is None:
        raise FileNotFoundError(
            f"Backbone {spec.name!r} has no Hugging Face repository; pass `weights=` with the path to "
            f"{' or '.join(spec.weight_files)} (see: {spec.citation})."
        )
    from huggingface_hub import try_to_load_from_cache

    for fname in spec.weight_files:
        hit = try_to_load_from_cache(spec.hf_repo, fname)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    raise FileNotFoundError(
        f"Weights of backbone {spec.name!r} not found in the local Hugging Face cache (repo {spec.hf_repo!r}, "
        f"files {list(spec.weight_files)}). Download them where the Hub is reachable, e.g. "
        f"`huggingface-cli download {spec.hf_repo}` (accept the licence {spec.license!r} on the Hub first if "
        "the repository is gated), or pass `weights=` with a local file. Weights are never replaced by "
        "random ones."
    )


def read_state_dict(path: Path) -> dict:
    """Read a checkpoint (safetensors, or a torch file loaded with ``weights_only=True``)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def apply_key_map(key_map, state_dict: dict, model) -> dict:
    """Call ``key_map(state_dict, model=model)``, or ``key_map(state_dict)`` if it takes no ``model``."""
    import inspect

    try:
        takes_model = "model" in inspect.signature(key_map).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_model = False
    return key_map(state_dict, model=model) if takes_model else key_map(state_dict)


def load_state_dict_strict(model, state_dict: dict, *, name: str, source: str) -> None:
    """Load ``state_dict`` into ``model`` and raise a clear error on any key or shape mismatch."""
    own = model.state_dict()
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"Weights {source} do not match backbone {name!r}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} shape mismatches {shapes[:3]}."
        )
    model.load_state_dict(sd, strict=True)


def pooled_features(spec: BackboneSpec, model: Any, x):
    """One embedding per image of a preprocessed batch ``x``, pooled as ``spec.pooling`` says."""
    import torch

    if spec.pooling == "module":
        return model(x)
    feats = model.forward_features(x)
    if feats.ndim == 4:  # CNN / Swin feature map
        return model.forward_head(feats, pre_logits=True)
    n_prefix = getattr(model, "num_prefix_tokens", 1)
    if spec.pooling == "cls+mean":
        return torch.cat([feats[:, 0], feats[:, n_prefix:].mean(1)], dim=-1)
    if spec.pooling == "avg":
        return feats[:, n_prefix:].mean(1)
    return feats[:, 0]


class Backbone:
    """A frozen feature extractor with its preprocessing.

    Use :func:`get_backbone` to create one. ``__call__``/:meth:`embed` maps uint8 tiles
    ``(B, H, W, 3)`` to ``(B, dim)`` embeddings; :meth:`forward_tokens` returns patch-token grids.
    """

    def __init__(self, spec: BackboneSpec, model: Any, *, device: Any = "cpu") -> None:
        self.spec = spec
        self.model = model
        self.device = device

    @property
    def name(self) -> str:
        """Registry name."""
        return self.spec.name

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(getattr(self.model, "dim", self.spec.dim))

    def preprocess(self, tiles):
        """uint8 ``(B, H, W, 3)`` tiles -> normalised float ``(B, 3, S, S)`` tensor at the input size."""
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.asarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.spec.input_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x):
        """Embeddings of a preprocessed batch."""
        import torch

        if not self.spec.is_torch:
            return self.model(x)
        with torch.inference_mode():
            return pooled_features(self.spec, self.model, x.to(self.device, non_blocking=True)).float().cpu()

    def compiled_forward(self, compile: bool | str = False):
        """:meth:`forward`, through :func:`torch.compile` when ``compile`` is set (torch backbones only).

        ``compile``: ``True`` (inductor) or a backend name; other backbones (``handcrafted``) run as they are.
        """
        from .._accel import check_compile

        backend = check_compile(compile)
        if backend is None or not self.spec.is_torch:
            return self.forward
        import torch

        fn = torch.compile(partial(pooled_features, self.spec, self.model), backend=backend, dynamic=True)

        def forward(x):
            with torch.inference_mode():
                return fn(x.to(self.device, non_blocking=True)).float().cpu()

        return forward

    def forward_tokens(self, x):
        """Patch-token grid ``(B, h, w, D)`` of a preprocessed batch (CNNs: the last feature map)."""
        import torch

        if not self.spec.is_torch or self.spec.pooling == "module":
            raise ValueError(f"Backbone {self.name!r} has no patch-token grid.")
        with torch.inference_mode():
            feats = self.model.forward_features(x.to(self.device))
            if feats.ndim == 4:  # NCHW (CNN) or NHWC (Swin)
                nhwc = str(getattr(self.model, "output_fmt", "NCHW")).upper() == "NHWC"
                return (feats if nhwc else feats.permute(0, 2, 3, 1)).float().cpu()
            tokens = feats[:, getattr(self.model, "num_prefix_tokens", 1) :]
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise ValueError(f"Cannot arrange {tokens.shape[1]} patch tokens on a square grid.")
            return tokens.reshape(tokens.shape[0], side, side, -1).float().cpu()

    def embed(self, tiles) -> np.ndarray:
        """Embeddings ``(B, dim)`` of uint8 tiles ``(B, H, W, 3)``."""
        out = self.forward(self.preprocess(tiles) if self.spec.is_torch else tiles)
        return np.asarray(out, dtype=np.float32)

    __call__ = embed


def _module_spec(module, *, name: str, input_size: int, mpp: float, mean, std) -> BackboneSpec:
    return BackboneSpec(name=name, dim=int(getattr(module, "num_features", 0) or 0), input_size=input_size, mpp=mpp,
                        mean=tuple(mean), std=tuple(std), license="user-provided", citation="user-provided",
                        pooling="module", needs_weights=False)


def get_backbone(
    backbone: str | Any,
    *,
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    input_size: int = 224,
    mpp: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Backbone:
    """Create a frozen backbone from the registry, or wrap a user's ``torch.nn.Module``/callable.

    Parameters
    ----------
    backbone
        A registered name (see :func:`list_backbones`), a :class:`Backbone` (returned as is), or a
        module/callable mapping a normalised ``(B, 3, S, S)`` tensor to ``(B, D)`` features.
    weights
        Path to a weight file (or a folder holding one); ``None`` looks in the local Hugging Face cache;
        ``"random"`` explicitly keeps random weights (for tests only).
    device
        Torch device; default ``stf.settings.device``.
    input_size, mpp, mean, std
        Preprocessing of a user-provided module (ignored for registered names).

    Returns
    -------
    A :class:`Backbone` in eval mode with gradients disabled.
    """
    from .._settings import settings

    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, str):
        spec = get_spec(backbone)
        load = spec.is_torch and spec.needs_weights and weights != RANDOM
        path = find_weights(spec, weights) if load else None  # fail fast, before building a large model
        model = spec.build(spec)
        if load:
            sd = read_state_dict(path)
            if spec.key_map is not None:
                sd = apply_key_map(spec.key_map, sd, model)
            load_state_dict_strict(model, sd, name=spec.name, source=str(path))
    elif callable(backbone):
        spec = _module_spec(backbone, name=type(backbone).__name__, input_size=input_size, mpp=mpp, mean=mean, std=std)
        model = backbone
    else:
        raise TypeError(f"backbone must be a registered name or a torch.nn.Module/callable, got {type(backbone).__name__}.")
    dev = "cpu"
    if spec.is_torch:
        dev = settings.torch_device(device)
        if hasattr(model, "eval"):
            model = model.eval().to(dev)
            for p in model.parameters():
                p.requires_grad_(False)
    return Backbone(spec, model, device=dev)
