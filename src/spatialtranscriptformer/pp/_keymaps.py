"""Converters from published checkpoint layouts to the timm key names the registry builds.

Phikon (``owkin/phikon``, a ``transformers`` ``ViTModel``) and Hibou (``histai/hibou-b``, a DINOv2 model
with register tokens and a SwiGLU feed-forward) are distributed in ``transformers`` format, CTransPath
(``ctranspath.pth`` of the TransPath repository) in the layout of timm 0.5.4, which TransPath pins; the
registry builds current timm architectures. These functions rename (and, for the attention input
projection, concatenate) the tensors so that the strict load in
:func:`~spatialtranscriptformer.pp.get_backbone` succeeds. They are our own code, written from the
published layouts of the libraries involved:

- ViT: Dosovitskiy et al. 2021, *An Image is Worth 16x16 Words* (ICLR); timm ``VisionTransformer``;
  ``transformers`` ``ViTModel``.
- DINOv2 with registers: Oquab et al. 2024, *DINOv2* (TMLR); Darcet et al. 2024, *Vision Transformers
  Need Registers* (ICLR); timm ``vit_*_reg4_dinov2``; ``transformers`` ``Dinov2WithRegistersModel``
  (the same names as the custom ``Dinov2ModelWithRegisters`` that ``histai/hibou-b`` ships).
- Swin: Liu et al. 2021, *Swin Transformer* (ICCV); Wang et al. 2022, CTransPath (*Medical Image
  Analysis* 81:102559); timm 0.5.4 and timm >= 0.9 ``SwinTransformer``.

Equivalence with the publishers' model classes is tested in ``tests/test_backbone_equivalence.py``
and summarised in the documentation page *Backbones*.

Keys that are not recognised keep their name, so the strict load reports them instead of dropping
them silently; only tensors without a timm counterpart and without effect on the features are
dropped (the ``pooler`` and ``classifier`` heads and the masked-image-modelling ``mask_token``;
the backbones are built with ``num_classes=0``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_PREFIXES = ("vit.", "dinov2_with_registers.", "dinov2.", "model.", "backbone.")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_QKV = ("query", "key", "value")
_DROPPED = ("pooler.", "classifier.", "embeddings.mask_token")

_VIT_LAYER = {
    "attention.output.dense.": "attn.proj.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}
_DINOV2_LAYER = {
    "attention.output.dense.": "attn.proj.",
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.fc1.",  # SwiGLU feed-forward (use_swiglu_ffn): packed [gate; value] projection
    "mlp.weights_out.": "mlp.fc2.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Remove one model-wrapper prefix (``vit.``, ``dinov2.``, ...) shared by the embedding keys."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in sd):
            return {k.removeprefix(prefix): v for k, v in sd.items()}
    return dict(sd)


def _is_transformers(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd)


def _rename_layers(sd: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    """Rename ``encoder.layer.{i}.*`` keys by ``table`` and merge query/key/value into ``attn.qkv``."""
    import torch

    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for k, v in sd.items():
        if k.startswith(_DROPPED):
            continue
        if k in _EMBED:
            out[_EMBED[k]] = v
            continue
        m = _LAYER.match(k)
        if m is None:
            out[k] = v  # unknown: keep, the strict load names it
            continue
        i, rest = m.groups()
        if rest.startswith("attention.attention."):
            proj, _, param = rest.removeprefix("attention.attention.").partition(".")
            if proj in _QKV:
                qkv.setdefault((i, param), {})[proj] = (k, v)
                continue
        for src, dst in table.items():
            if rest.startswith(src):
                out[f"blocks.{i}.{dst}{rest.removeprefix(src)}"] = v
                break
        else:
            out[k] = v
    for (i, param), parts in qkv.items():
        if set(parts) != set(_QKV):
            for k, v in parts.values():  # incomplete: keep the names, the strict load reports them
                out[k] = v
            continue
        shapes = {p: tuple(parts[p][1].shape) for p in _QKV}
        if len({s[1:] for s in shapes.values()}) != 1:
            raise ValueError(
                f"Checkpoint layer encoder.layer.{i}: attention query/key/value {param} tensors have "
                f"incompatible shapes {shapes}; cannot build blocks.{i}.attn.qkv.{param}."
            )
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[p][1] for p in _QKV], dim=0)
    return out


def _resample_grid(pos, grid_size: Sequence[int] | None, *, key: str):
    """Resample ``(1, h*w, D)`` patch position embeddings to ``grid_size`` (bicubic, antialiased).

    This is what ``transformers`` does at run time when the input grid differs from the checkpoint's
    (``interpolate_pos_encoding``), done once here so the timm model sees its own grid.
    """
    import torch.nn.functional as F

    if grid_size is None:
        return pos
    gh, gw = (int(g) for g in grid_size)
    n, dim = pos.shape[1], pos.shape[2]
    if n == gh * gw:
        return pos
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"Checkpoint {key}: {n} patch positions do not form a square grid; cannot resample to {gh}x{gw}.")
    grid = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos.dtype)


def hf_vit_to_timm(state_dict: Mapping[str, Any], *, grid_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Convert a ``transformers`` ``ViTModel`` state dict to timm ``vit_*_patch16_*`` names.

    ``encoder.layer.{i}.attention.attention.{query,key,value}`` become the concatenated
    ``blocks.{i}.attn.qkv``; ``attention.output.dense`` -> ``attn.proj``, ``layernorm_before`` ->
    ``norm1``, ``layernorm_after`` -> ``norm2``, ``intermediate.dense`` -> ``mlp.fc1``, ``output.dense``
    -> ``mlp.fc2``, the final ``layernorm`` -> ``norm``; ``pooler.*``, ``classifier.*`` and
    ``embeddings.mask_token`` are dropped. A ``vit.`` prefix (``ViTFor*`` heads) is accepted. Used for Phikon (Filiot et al. 2023).

    Parameters
    ----------
    state_dict
        Checkpoint tensors; a checkpoint already in timm names is returned unchanged.
    grid_size
        Patch grid ``(h, w)`` of the target model; position embeddings of another grid are resampled
        bicubically. ``None`` keeps them as they are (a mismatch is then reported by the strict load).

    Returns
    -------
    A new state dict in timm names (the input is not modified). The class-token position is kept in
    ``pos_embed`` (timm ViT-B/16 stores ``1 + h*w`` positions).
    """
    sd = _strip_prefix(state_dict)
    if not _is_transformers(sd):
        return state_dict  # already timm (or unknown): the strict load decides
    out = _rename_layers(sd, _VIT_LAYER)
    if "pos_embed" in out and grid_size is not None:
        pos = out["pos_embed"]
        out["pos_embed"] = _cat_tokens(pos[:, :1], _resample_grid(pos[:, 1:], grid_size, key="embeddings.position_embeddings"))
    return out


def hf_dinov2_to_timm(state_dict: Mapping[str, Any], *, grid_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Convert a ``transformers`` DINOv2 (with registers) state dict to timm ``vit_*_reg4_dinov2`` names.

    ``embeddings.register_tokens`` -> ``reg_token``; query/key/value -> ``blocks.{i}.attn.qkv``;
    ``attention.output.dense`` -> ``attn.proj``; ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``;
    ``norm1``/``norm2``/``mlp.fc1``/``mlp.fc2`` keep their names under ``blocks.{i}``; the SwiGLU
    feed-forward's ``mlp.weights_in``/``mlp.weights_out`` become ``mlp.fc1``/``mlp.fc2`` of timm's
    ``SwiGLUPacked`` (both compute ``silu(x1) * x2`` of the two halves of the first projection); the final
    ``layernorm`` -> ``norm``; ``embeddings.mask_token`` is dropped. Prefixes ``dinov2.`` and
    ``dinov2_with_registers.`` are accepted. Used for Hibou (Nechaev et al. 2024).

    ``transformers`` stores ``1 + h*w`` position embeddings and adds the first to the class token
    (register tokens get none); timm's DINOv2 models (``no_embed_class``) store only the ``h*w`` patch
    positions, so the class position is folded into ``cls_token`` here, which gives the same forward.

    Parameters
    ----------
    state_dict
        Checkpoint tensors; a checkpoint already in timm names is returned unchanged.
    grid_size
        Patch grid ``(h, w)`` of the target model; position embeddings of another grid are resampled
        bicubically (antialiased, as ``transformers`` interpolates them at run time). ``None`` keeps
        them as they are (a mismatch is then reported by the strict load).

    Returns
    -------
    A new state dict in timm names (the input is not modified).
    """
    sd = _strip_prefix(state_dict)
    if not _is_transformers(sd):
        return state_dict
    out = _rename_layers(sd, _DINOV2_LAYER)
    if "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        if pos.ndim != 3 or out["cls_token"].shape[-1] != pos.shape[-1]:
            raise ValueError(
                f"Checkpoint embeddings.position_embeddings {tuple(pos.shape)} does not fit "
                f"embeddings.cls_token {tuple(out['cls_token'].shape)}."
            )
        out["cls_token"] = out["cls_token"] + pos[:, :1].to(out["cls_token"].dtype)
        out["pos_embed"] = _resample_grid(pos[:, 1:], grid_size, key="embeddings.position_embeddings")
    return out


def _cat_tokens(a, b):
    import torch

    return torch.cat([a, b.to(a.dtype)], dim=1)


_TRANSPATH_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_SWIN_BUFFERS = (".relative_position_index", ".attn_mask")


def transpath_swin_to_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Convert CTransPath's ``ctranspath.pth`` (timm 0.5.4 Swin layout) to timm >= 0.9 Swin names.

    TransPath (Wang et al. 2022) builds ``swin_tiny_patch4_window7_224`` of timm 0.5.4 with its
    convolutional stem as patch embedding (``ctran.py``) and saves ``{"model": state_dict}`` loaded
    with ``strict=True`` after ``model.head = nn.Identity()`` (``get_features_CTransPath.py``). Two
    things differ from current timm: the patch-merging layer closing stage ``i`` is stored as
    ``layers.{i}.downsample`` (timm >= 0.9 opens stage ``i + 1`` with it: ``layers.{i+1}.downsample``),
    and the window buffers ``relative_position_index`` and ``attn_mask`` are saved (current timm
    recomputes them from the window geometry and does not store them). This renames the former and
    drops the latter, and drops a classifier ``head.*`` if present (the backbone has no head);
    everything else, the convolutional stem ``patch_embed.proj.{0,1,3,4,6}`` included, keeps its name.

    Parameters
    ----------
    state_dict
        Checkpoint tensors (the ``"model"`` entry is unwrapped by the loader); a checkpoint already in
        the current layout (no ``layers.0.downsample``) is returned unchanged.

    Returns
    -------
    A new state dict in timm >= 0.9 names (the input is not modified).
    """
    if not any(k.startswith("layers.0.downsample.") for k in state_dict):
        return state_dict if isinstance(state_dict, dict) else dict(state_dict)
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        if k.endswith(_SWIN_BUFFERS) or k.startswith("head."):
            continue
        out[_TRANSPATH_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)] = v
    return out
