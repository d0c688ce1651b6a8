"""What a saved :class:`~spatialtranscriptformer.tl.SuperResModel` holds beyond the common folder format.

The folder format itself (``config.json``, ``history.csv``, atomic writes, format and version checks) is
:class:`~spatialtranscriptformer.tl.BaseModel`'s. A super-resolution model adds to ``config.json`` its
patch geometry, loss, scales, decoder and plan hyperparameters and a description of its backbone, and
writes ``weights.pt`` (the decoder's state dict, read back with ``torch.load(weights_only=True)``),
``arrays.npz`` (z-score statistics of ``loss="mse"``, read without pickle) and, for a backbone that is not
a registered one with weights from a file or the Hugging Face cache, ``backbone.pt`` (its state dict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._base import CONFIG_FILE as _CONFIG

if TYPE_CHECKING:
    from ._superres import SuperResModel

_WEIGHTS, _BACKBONE, _ARRAYS = "weights.pt", "backbone.pt", "arrays.npz"
_SPEC_FIELDS = ("name", "dim", "input_size", "mpp", "mean", "std", "license", "citation", "pooling", "arch")


def _decoder_config(decoder) -> dict:
    """Constructor arguments of a :class:`~..module._superres.SuperResDecoder`, read from the module."""
    cfg = {
        "in_dim": int(decoder.proj[0].normalized_shape[0]),
        "n_genes": int(decoder.n_genes),
        "grid": int(decoder.start),  # only the power-of-two start of the upsampling depends on the grid
        "arch": str(decoder.arch),
        "hidden": int(decoder.hidden),
        "out_size": int(decoder.out_size),
    }
    if decoder.arch == "hist2st":
        layer = decoder.transformer.layers[0]
        cfg.update(
            n_layers=len(decoder.transformer.layers),
            n_heads=int(layer.self_attn.num_heads),
            dropout=float(layer.dropout.p),
        )
    return cfg


def _is_registered(backbone) -> bool:
    from ..pp._registry import get_spec

    try:
        return get_spec(backbone.name) is backbone.spec
    except ValueError:
        return False


def _backbone_config(model: SuperResModel) -> dict:
    bb = model.backbone
    spec = bb.spec
    out = {f: getattr(spec, f) for f in _SPEC_FIELDS}
    out["mean"], out["std"] = list(spec.mean), list(spec.std)
    try:
        json.dumps(spec.timm_kwargs)
        out["timm_kwargs"] = dict(spec.timm_kwargs)
    except TypeError:
        out["timm_kwargs"] = None  # classes or functions: the architecture cannot be rebuilt from JSON
    out["registered"] = _is_registered(bb)
    weights = model.params.get("backbone_weights")
    from ..pp._backbones import RANDOM

    # a registered backbone with weights from a file / the HF cache is stored by reference; anything else
    # (random weights, an ad-hoc Backbone, a user's module) by its state dict
    by_reference = out["registered"] and (not spec.needs_weights or weights != RANDOM)
    out["weights"] = weights if by_reference else None
    has_state = hasattr(bb.model, "state_dict") and not by_reference
    out["state_file"] = _BACKBONE if has_state else None
    out["fingerprint"] = _fingerprint(bb.model) if by_reference else None
    return out


def _fingerprint(module) -> float | None:
    """Sum of the absolute values of all parameters and buffers (detects other weights at load time)."""
    if not hasattr(module, "state_dict"):
        return None
    return float(sum(float(v.detach().double().abs().sum()) for v in module.state_dict().values() if v.is_floating_point()))


def superres_config(model: SuperResModel) -> dict:
    """The entries of ``config.json`` of a super-resolution model beyond the common ones."""
    plan = model.plan
    return {
        "patch_um": int(model.patch_um),
        "scales": [int(s) for s in plan.scales],
        "gradnorm": plan.gradnorm is not None,
        "plan": {
            "lr": float(plan.lr),
            "weight_decay": float(plan.weight_decay),
            "warmup_epochs": int(plan.warmup_epochs),
            **(
                {"alpha": plan.gradnorm.alpha, "gradnorm_lr": plan.gradnorm.lr}
                if plan.gradnorm is not None
                else {}
            ),
        },
        "decoder": _decoder_config(model.decoder),
        "backbone": _backbone_config(model),
        "arrays": ["zstats"] if plan.loss_name == "mse" else [],
    }


def write_superres_state(model: SuperResModel, folder: Path) -> None:
    """Decoder weights, the backbone's state dict when it is not stored by reference, z-score statistics."""
    import torch

    torch.save({k: v.detach().cpu() for k, v in model.decoder.state_dict().items()}, folder / _WEIGHTS)
    if _backbone_config(model)["state_file"]:
        state = model.backbone.model.state_dict()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, folder / _BACKBONE)
    if model.plan.loss_name == "mse":
        np.savez(folder / _ARRAYS, zstats=model.plan.zstats.detach().cpu().numpy())


def _wrap(spec, module):
    import torch

    from .._settings import settings
    from ..pp._backbones import Backbone

    dev = settings.torch_device(None)
    if isinstance(module, torch.nn.Module):
        module = module.eval().to(dev)
        for p in module.parameters():
            p.requires_grad_(False)
    return Backbone(spec, module, device=dev)


_TIMM_FORBIDDEN = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
"""``timm.create_model`` arguments that would read weights or configurations from elsewhere (or the network)."""


def _safe_backbone_config(path: Path, bcfg: Any) -> Path | None:
    """Refuse a backbone description that would read outside the model folder or reach the network.

    Returns the backbone state file (inside ``path``) or ``None``.
    """
    cfg_path = path / _CONFIG
    if not isinstance(bcfg, dict) or not isinstance(bcfg.get("name"), str):
        raise ValueError(f"{cfg_path}: 'backbone' must be an object with a 'name'.")
    arch = bcfg.get("arch")
    if arch is not None and (not isinstance(arch, str) or ":" in arch or "/" in arch or "\\" in arch):
        raise ValueError(
            f"{cfg_path}: backbone arch {arch!r} refers to a hub or a location (e.g. 'hf-hub:'); loading a model "
            "never reaches the network or reads outside its folder. Pass the architecture with `backbone=`."
        )
    kw = bcfg.get("timm_kwargs")
    if kw is not None:
        if not isinstance(kw, dict):
            raise ValueError(f"{cfg_path}: backbone timm_kwargs must be an object, got {type(kw).__name__}.")
        bad = sorted(set(kw) & set(_TIMM_FORBIDDEN))
        if bad:
            raise ValueError(
                f"{cfg_path}: backbone timm_kwargs {bad} would load weights or configurations from elsewhere; "
                "refused (the weights of a saved model are in its folder)."
            )
    state_file = bcfg.get("state_file")
    if state_file is None:
        return None
    if not isinstance(state_file, str) or not state_file or Path(state_file).name != state_file:
        raise ValueError(
            f"{cfg_path}: backbone state_file {state_file!r} must be a file name inside the model folder {path}."
        )
    state_path = path / state_file
    if path.resolve() not in state_path.resolve().parents:  # a symbolic link out of the folder
        raise ValueError(f"{cfg_path}: backbone state_file {state_file!r} resolves outside the model folder {path}.")
    return state_path


def _torch_load(p: Path):
    import torch

    from .._validate import reading

    with reading(p, "weights file"):
        return torch.load(p, map_location="cpu", weights_only=True)


def _load_backbone(path: Path, bcfg: dict, backbone, backbone_weights):
    """The frozen backbone of a saved model: rebuilt, or the user's ``backbone`` (given saved weights)."""
    import torch

    from ..pp._backbones import Backbone, get_backbone, load_state_dict_strict
    from ..pp._registry import BackboneSpec, get_spec

    state_path = _safe_backbone_config(path, bcfg)
    if state_path is not None and not state_path.is_file():
        raise FileNotFoundError(f"Backbone weights not found: {state_path}.")
    hint = "pass the backbone architecture with `backbone=` (a torch.nn.Module or a Backbone)"
    if backbone is not None and not isinstance(backbone, str | Backbone | torch.nn.Module):
        raise TypeError(f"backbone must be a registered name, a Backbone or a torch.nn.Module, got {type(backbone).__name__}.")
    if bcfg["registered"] and not isinstance(backbone, Backbone | torch.nn.Module):
        name = backbone if isinstance(backbone, str) else bcfg["name"]
        if state_path is None:
            bb = get_backbone(name, weights=backbone_weights if backbone_weights is not None else bcfg.get("weights"))
            fp, saved = _fingerprint(bb.model), bcfg.get("fingerprint")
            if saved is not None and fp is not None and not np.isclose(fp, saved, rtol=1e-5, atol=1e-8):
                raise ValueError(
                    f"The weights of backbone {name!r} found now differ from those the model was trained with "
                    f"(parameter checksum {fp:.6g} vs {saved:.6g}); pass the original weights with `backbone_weights=`."
                )
            return bb
        spec = get_spec(name)
        module = spec.build(spec)
    elif isinstance(backbone, str):
        return get_backbone(backbone, weights=backbone_weights)
    else:
        kw = {f: bcfg[f] for f in _SPEC_FIELDS}
        spec = get_spec(bcfg["name"]) if bcfg["registered"] else BackboneSpec(
            **{**kw, "mean": tuple(kw["mean"]), "std": tuple(kw["std"])},
            timm_kwargs=bcfg.get("timm_kwargs") or {}, needs_weights=False,
        )
        if isinstance(backbone, Backbone):
            spec, module = backbone.spec, backbone.model
        elif backbone is not None:
            module = backbone
        elif state_path is not None and bcfg.get("arch") and bcfg.get("timm_kwargs") is not None:
            import timm

            try:
                module = timm.create_model(bcfg["arch"], pretrained=False, num_classes=0, **bcfg["timm_kwargs"])
            except Exception as err:  # noqa: BLE001  (any timm failure means: cannot rebuild)
                raise ValueError(f"Cannot rebuild backbone {bcfg['name']!r} ({bcfg['arch']!r}): {err}; {hint}.") from None
        else:
            raise ValueError(f"Backbone {bcfg['name']!r} of the saved model cannot be rebuilt from {path / _CONFIG}; {hint}.")
    if state_path is not None:
        state = _torch_load(state_path)
        try:
            load_state_dict_strict(module, state, name=bcfg["name"], source=str(state_path))
        except ValueError as err:
            raise ValueError(f"{err} If the architecture was built with other arguments, {hint}.") from None
    return _wrap(spec, module)


def read_superres(path: Path, cfg: dict, *, backbone=None, backbone_weights: str | os.PathLike | None = None):
    """Rebuild the super-resolution model saved in ``path``; every state dict must fit ``cfg`` exactly."""
    from .._validate import check_config_types, reading
    from ..module._superres import SuperResDecoder
    from ..train._superres_plan import SuperResPlan
    from ._superres import SuperResModel

    cfg_path = path / _CONFIG
    missing = [k for k in ("genes", "patch_um", "loss", "scales", "gradnorm", "decoder", "backbone") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} lacks {missing}.")
    check_config_types(cfg, {"genes": list, "patch_um": int, "loss": str, "scales": list, "gradnorm": bool,
                             "decoder": dict, "backbone": dict, "plan": dict, "params": dict, "fit": dict},
                       path=cfg_path)
    _safe_backbone_config(path, cfg["backbone"])  # before anything is built: no network, nothing outside
    genes, dcfg = [str(g) for g in cfg["genes"]], dict(cfg["decoder"])
    if not genes or len(set(genes)) != len(genes):
        raise ValueError(f"{cfg_path}: the gene list is empty or has duplicates.")
    if dcfg.get("n_genes") != len(genes):
        raise ValueError(f"{cfg_path}: {len(genes)} genes but a decoder for {dcfg.get('n_genes')} genes.")
    if dcfg.get("out_size") != int(cfg["patch_um"]) // 2:
        raise ValueError(f"{cfg_path}: patch_um {cfg['patch_um']} does not match a {dcfg.get('out_size')}-bin decoder output.")
    wpath = path / _WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"Decoder weights not found: {wpath}.")
    zstats = None
    if cfg["loss"] == "mse":
        apath = path / _ARRAYS
        if not apath.is_file():
            raise FileNotFoundError(f"z-score statistics of the loss='mse' model not found: {apath}.")
        with reading(apath, "arrays file"), np.load(apath, allow_pickle=False) as z:
            if "zstats" not in z.files:
                raise ValueError(f"{apath} lacks the array 'zstats'.")
            zstats = z["zstats"]
        if zstats.shape != (len(cfg["scales"]), len(genes), 2):
            raise ValueError(f"{apath}: zstats has shape {zstats.shape}, expected ({len(cfg['scales'])}, {len(genes)}, 2).")
    try:
        in_dim, n_genes = dcfg.pop("in_dim"), dcfg.pop("n_genes")
        decoder = SuperResDecoder(in_dim, n_genes, **dcfg)
        plan = SuperResPlan(decoder, loss=cfg["loss"], scales=cfg["scales"], gradnorm=bool(cfg["gradnorm"]),
                            zstats=zstats, **cfg.get("plan", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: invalid decoder/plan configuration: {err}") from None
    state = _torch_load(wpath)
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{wpath} does not match the decoder configured in {cfg_path}: {err}") from None
    bb = _load_backbone(path, cfg["backbone"], backbone, backbone_weights)
    if backbone is not None:  # the user's architecture: its token width must fit the decoder
        s = bb.spec.input_size
        dim = bb.forward_tokens(bb.preprocess(np.zeros((1, s, s, 3), dtype=np.uint8))).shape[-1]
        if dim != in_dim:
            raise ValueError(f"backbone {bb.name!r} gives {dim}-d tokens; the saved decoder reads {in_dim}-d tokens.")
    params = cfg.get("fit", cfg.get("params")) or {}  # version 1 called the fit parameters "params"
    return SuperResModel(plan.eval(), bb, genes=genes, patch_um=int(cfg["patch_um"]), params=params,
                         history=SuperResModel.read_history(path), best_epoch=cfg.get("best_epoch"))
