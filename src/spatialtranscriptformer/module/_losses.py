"""Masked losses of the SpatialTranscriptFormer and the baselines.

All losses take a ``(B, S)`` boolean ``mask`` (``True`` = real spot) and ignore padded spots entirely.

- ``mse``: mean squared error over real spots and genes.
- ``pcc``: 1 - Pearson r of each gene across the real spots of each slide, averaged over genes and
  slides (spatial-pattern coherence, scale and shift invariant). A gene that is constant in the
  prediction or the target of a slide contributes r = 0 (never NaN).
- ``mse_pcc``: ``mse + pcc_weight * pcc``.
- ``zinb``: zero-inflated negative binomial NLL of raw counts (Risso et al. 2018, ZINB-WaVE; Lopez et
  al. 2018, scVI), parametrised by the mean ``mu``, inverse dispersion ``theta`` and dropout ``pi``.
- ``poisson``: Poisson NLL of raw counts, ``rate - y log(rate + 1e-8)`` (constant ``log y!`` dropped,
  as :func:`torch.nn.functional.poisson_nll_loss` with ``log_input=False, full=False``).
- auxiliary pathway loss: ``1 - PCC(pathway scores, pathway targets)`` over spots (the design's
  ``AuxiliaryPathwayLoss``), added with weight ``pathway_loss_weight``.
- pathway structure loss: the mean squared difference between the spot-wise correlation matrices of the
  predicted pathway scores and of their targets (anti-collapse). The auxiliary loss alone lets every
  pathway token converge on the one histology axis that explains most pathways (held-out her2st: median
  pairwise absolute r between predicted pathway maps 0.99, against 0.63 between the measured activities); this
  term asks the maps to relate to each other as the measured activities do. Added with weight
  ``pathway_structure_weight`` (times ``pathway_loss_weight``'s presence: it needs pathway targets).

The count likelihoods expect raw (non-negative, integer) counts; they are defined for non-integer values
too (via ``lgamma``), so checking integrality is the data layer's job, not the loss's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

LOSSES = ("mse", "pcc", "mse_pcc", "zinb", "poisson")
"""Valid loss names."""

_EPS = 1e-8
_CONST_REL = 1e-5  # a column whose std is <= 1e-5 x |mean| (float32 round-off) counts as constant
_TINY = 1e-30


def _spot_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``(..., S, 1)`` float mask matching ``like`` (``(..., S, G)``); all ones when ``mask`` is None."""
    if mask is None:
        return like.new_ones((*like.shape[:-1], 1))
    if tuple(mask.shape) != tuple(like.shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(like.shape[:-1])}.")
    return mask.to(like.dtype).unsqueeze(-1)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: prediction shape {tuple(a.shape)} differs from target {tuple(b.shape)}.")


def masked_mean_over_spots(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, S, G)`` values over the real spots of each slide -> ``(B, G)``."""
    m = _spot_mask(mask, y)
    return (y * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the real spots (all entries when ``mask`` is None).

    Parameters
    ----------
    pred, target
        ``(B, S, G)`` (or ``(B, G)`` with a ``(B,)`` mask).
    mask
        Boolean, ``True`` for entries that count.

    Returns
    -------
    Scalar tensor.
    """
    _check_same_shape(pred, target, "masked_mse")
    m = _spot_mask(mask, pred)
    n = m.sum() * pred.shape[-1]
    return ((pred - target) ** 2 * m).sum() / n.clamp_min(1.0)


def pearson_per_gene(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pearson r of each gene across the real spots of each slide.

    Parameters
    ----------
    pred, target
        ``(B, S, G)``; a 2-D ``(N, G)`` input is one group of N rows (e.g. slide-level predictions
        correlated across slides).
    mask
        ``(B, S)`` (``(N,)`` for 2-D input) boolean.

    Returns
    -------
    ``(B, G)`` correlations (``(1, G)`` for 2-D input); 0 where the prediction or the target is constant
    over the slide's real spots (or the slide has fewer than 2 real spots).
    """
    _check_same_shape(pred, target, "pearson_per_gene")
    if pred.ndim == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    m = _spot_mask(mask, pred)
    n = m.sum(dim=-2, keepdim=True).clamp_min(1.0)
    pm = (pred * m).sum(dim=-2, keepdim=True) / n
    tm = (target * m).sum(dim=-2, keepdim=True) / n
    pc, tc = (pred - pm) * m, (target - tm) * m
    cov = (pc * tc).sum(dim=-2)
    vp, vt = (pc * pc).sum(dim=-2), (tc * tc).sum(dim=-2)
    n, pm, tm = n.squeeze(-2), pm.squeeze(-2).detach(), tm.squeeze(-2).detach()
    valid = (vp > n * (_CONST_REL * pm) ** 2 + _TINY) & (vt > n * (_CONST_REL * tm) ** 2 + _TINY)
    denom = vp.clamp_min(_TINY).sqrt() * vt.clamp_min(_TINY).sqrt()
    r = torch.where(valid, cov / denom, torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0)


def pcc_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean r``: Pearson r per gene across the real spots of each slide, averaged over genes/slides.

    Parameters
    ----------
    pred, target
        ``(B, S, G)`` (2-D ``(N, G)``: correlation across the N rows).
    mask
        ``(B, S)`` boolean, ``True`` for real spots.

    Returns
    -------
    Scalar in ``[0, 2]``: 0 for a perfect (up to positive scale and shift) spatial pattern, 2 for a
    perfectly anti-correlated one, 1 for a constant prediction.
    """
    return 1.0 - pearson_per_gene(pred, target, mask).mean()


def zinb_nll(
    target: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean zero-inflated negative binomial NLL over real entries.

    ``NB(y; mu, theta) = Gamma(y + theta) / (Gamma(theta) y!) (theta / (theta + mu))^theta
    (mu / (theta + mu))^y``; ``ZINB(0) = pi + (1 - pi) NB(0)``, ``ZINB(y > 0) = (1 - pi) NB(y)``.

    Parameters
    ----------
    target
        Raw counts ``y`` (non-negative).
    mu
        Mean of the NB component (> 0).
    theta
        Inverse dispersion (> 0); variance ``mu + mu^2 / theta``.
    pi
        Zero-inflation probability in ``[0, 1]``.
    mask
        ``(B, S)`` boolean over the leading dimensions.

    Returns
    -------
    Scalar tensor.
    """
    _check_same_shape(mu, target, "zinb_nll")
    y = target
    log_theta_mu = torch.log(theta + mu + _EPS)
    nb_zero = theta * (torch.log(theta + _EPS) - log_theta_mu)
    log_nb = (
        torch.lgamma(y + theta)
        - torch.lgamma(theta)
        - torch.lgamma(y + 1.0)
        + nb_zero
        + y * (torch.log(mu + _EPS) - log_theta_mu)
    )
    log_pi = torch.log(pi.clamp_min(_EPS))
    log_1m_pi = torch.log1p(-pi.clamp_max(1.0 - 1e-7))
    ll_zero = torch.logaddexp(log_pi, log_1m_pi + nb_zero)
    ll = torch.where(y < _EPS, ll_zero, log_1m_pi + log_nb)
    m = _spot_mask(mask, y)
    return -(ll * m).sum() / (m.sum() * y.shape[-1]).clamp_min(1.0)


def poisson_nll(rate: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Poisson NLL ``rate - y log(rate + 1e-8)`` over real entries (``log y!`` dropped).

    Parameters
    ----------
    rate
        Predicted rate (>= 0).
    target
        Raw counts.
    mask
        ``(B, S)`` boolean over the leading dimensions.

    Returns
    -------
    Scalar tensor.
    """
    _check_same_shape(rate, target, "poisson_nll")
    nll = rate - target * torch.log(rate + _EPS)
    m = _spot_mask(mask, rate)
    return (nll * m).sum() / (m.sum() * rate.shape[-1]).clamp_min(1.0)


def pathway_aux_loss(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Auxiliary pathway loss ``1 - PCC`` of pathway scores vs targets across the real spots of a slide.

    Parameters
    ----------
    scores
        ``(B, S, P)`` predicted pathway scores (2-D ``(N, P)``: correlation across the N rows).
    targets
        Pathway activity targets of the same shape (z-scored member-gene means).
    mask
        ``(B, S)`` boolean.

    Returns
    -------
    Scalar tensor.
    """
    return pcc_loss(scores, targets, mask)


def _spot_correlation(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, P, P)`` Pearson correlations between the P columns of ``a`` across each slide's real spots."""
    m = _spot_mask(mask, a)
    n = m.sum(dim=-2, keepdim=True).clamp_min(1.0)
    c = (a - (a * m).sum(dim=-2, keepdim=True) / n) * m
    c = c / c.pow(2).sum(dim=-2, keepdim=True).clamp_min(_TINY).sqrt()
    return c.transpose(-1, -2) @ c


def pathway_structure_loss(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared difference of the pathway-by-pathway correlation matrices of scores and targets.

    Parameters
    ----------
    scores, targets
        ``(B, S, P)`` predicted pathway scores and pathway activity targets.
    mask
        ``(B, S)`` boolean.

    Returns
    -------
    Scalar tensor in ``[0, 4]``: 0 when the predicted maps correlate with each other exactly as the
    measured activities do, about 1 when all predicted maps are one map while the targets are independent.
    """
    _check_same_shape(scores, targets, "pathway_structure_loss")
    if scores.ndim != 3:
        raise ValueError("pathway_structure_loss needs per-spot scores (B, S, P).")
    return (_spot_correlation(scores, mask) - _spot_correlation(targets, mask)).pow(2).mean()


def compute_loss(
    out: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    *,
    loss: str,
    pcc_weight: float = 1.0,
    pathway_loss_weight: float = 0.0,
    pathway_structure_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total training loss of a model output against a batch.

    Parameters
    ----------
    out
        Model output (``"expr"`` and the keys the loss needs: ``"rate"``; ``"mu"``, ``"theta"``, ``"pi"``;
        ``"pathway_scores"`` when ``pathway_loss_weight > 0``). A 2-D ``"expr"`` ``(B, G)`` is a
        slide-level prediction: its target is the mean of ``y`` over the real spots of each slide, and
        its PCC is computed per gene across the slides of the batch (0 for a batch of one slide).
    batch
        ``{"y": (B, S, G), "mask": (B, S), "pathway_targets": (B, S, P) (optional), ...}``.
    loss
        One of :data:`LOSSES`.
    pcc_weight
        Weight ``alpha`` of the PCC term in ``mse_pcc``.
    pathway_loss_weight
        Weight ``lambda_aux`` of the auxiliary pathway loss.
    pathway_structure_weight
        Weight of :func:`pathway_structure_loss` (spot-level models with pathway targets only).

    Returns
    -------
    The total loss tensor and its parts as floats (``"mse"``, ``"pcc"``, ``"zinb"``, ``"poisson"``,
    ``"pathway"``, ``"total"`` as applicable).
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; valid losses: {list(LOSSES)}.")
    if pcc_weight < 0 or pathway_loss_weight < 0 or pathway_structure_weight < 0:
        raise ValueError(
            f"Loss weights must be >= 0, got pcc_weight={pcc_weight}, pathway_loss_weight={pathway_loss_weight}, "
            f"pathway_structure_weight={pathway_structure_weight}."
        )
    for key in ("y", "mask"):
        if key not in batch:
            raise KeyError(f"The batch has no {key!r} entry (keys: {sorted(batch)}).")
    if "expr" not in out:
        raise KeyError(f"The model output has no 'expr' entry (keys: {sorted(out)}).")
    mask = batch["mask"].bool()
    y = batch["y"]
    slide_level = out["expr"].ndim == 2
    target, m = (masked_mean_over_spots(y, mask), None) if slide_level else (y, mask)

    def need(*keys: str) -> list[torch.Tensor]:
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(f"Loss {loss!r} needs model outputs {missing}; the model returned {sorted(out)}.")
        return [out[k] for k in keys]

    parts: dict[str, torch.Tensor] = {}
    if loss in ("mse", "mse_pcc"):
        parts["mse"] = masked_mse(out["expr"], target, m)
    if loss in ("pcc", "mse_pcc"):
        parts["pcc"] = pcc_loss(out["expr"], target, m)
    if loss == "zinb":
        mu, theta, pi = need("mu", "theta", "pi")
        parts["zinb"] = zinb_nll(target, mu, theta, pi, m)
    if loss == "poisson":
        (rate,) = need("rate")
        parts["poisson"] = poisson_nll(rate, target, m)
    total = parts["pcc"] if loss == "pcc" else parts.get("mse", parts.get("zinb", parts.get("poisson")))
    if loss == "mse_pcc":
        total = parts["mse"] + pcc_weight * parts["pcc"]
    if pathway_loss_weight > 0:
        if "pathway_scores" not in out:
            raise KeyError(
                "pathway_loss_weight > 0 needs a model with pathway scores ('pathway_scores' output); "
                f"this model returned {sorted(out)}."
            )
        if "pathway_targets" not in batch:
            raise KeyError("pathway_loss_weight > 0 needs 'pathway_targets' in the batch (pathway activity).")
        scores, pt = out["pathway_scores"], batch["pathway_targets"]
        if scores.ndim == 2:
            pt = masked_mean_over_spots(pt, mask)
        parts["pathway"] = pathway_aux_loss(scores, pt, None if scores.ndim == 2 else mask)
        total = total + pathway_loss_weight * parts["pathway"]
        if pathway_structure_weight > 0 and scores.ndim == 3:
            parts["pathway_structure"] = pathway_structure_loss(scores, pt, mask)
            total = total + pathway_structure_weight * parts["pathway_structure"]
    logged = {k: float(v.detach()) for k, v in parts.items()}
    logged["total"] = float(total.detach())
    return total, logged


__all__ = [
    "LOSSES",
    "compute_loss",
    "masked_mean_over_spots",
    "masked_mse",
    "pathway_aux_loss",
    "pathway_structure_loss",
    "pcc_loss",
    "pearson_per_gene",
    "poisson_nll",
    "zinb_nll",
]
