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

The loss table
--------------
Every training loss is one entry of the table of this module (:func:`register_loss`): its function, the
output head it needs from a model (``"expr"``: a linear prediction; ``"rate"``: a positive Poisson rate;
``"zinb"``: mean, inverse dispersion and dropout), and whether it trains on raw counts (``counts=True``:
predictions are counts) or on ``log1p`` counts when ``log_transform`` (predictions are log1p counts).
Models build their output heads from the entry, the data layer its targets, :func:`compute_loss` the
total, the model wrapper its target space: a new loss is one :func:`register_loss` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

LOSSES = ("mse", "pcc", "mse_pcc", "zinb", "poisson")
"""The built-in losses (:func:`available_losses` lists these and any registered since)."""
HEADS = {"expr": ("expr",), "rate": ("rate",), "zinb": ("mu", "theta", "pi")}
"""Output heads a loss can ask for, and the model outputs each provides (besides ``"expr"``)."""

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
        A loss of the table (:func:`available_losses`).
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
    spec = get_loss(loss)
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
    missing = [k for k in spec.outputs if k not in out]
    if missing:
        raise KeyError(f"Loss {loss!r} needs model outputs {missing}; the model returned {sorted(out)}.")
    mask = batch["mask"].bool()
    y = batch["y"]
    slide_level = out["expr"].ndim == 2
    target, m = (masked_mean_over_spots(y, mask), None) if slide_level else (y, mask)

    res = spec.fn(out, target, m, pcc_weight=pcc_weight)
    if isinstance(res, Mapping):
        parts: dict[str, torch.Tensor] = {k: v for k, v in res.items() if k != "total"}
        total = res["total"]
    else:
        parts, total = {loss: res}, res
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


@dataclass(frozen=True)
class LossSpec:
    """One entry of the loss table.

    Attributes
    ----------
    name
        Name passed as ``loss=`` to :func:`~spatialtranscriptformer.tl.fit`.
    fn
        ``fn(out, target, mask, *, pcc_weight) -> Tensor | dict``: the loss of model outputs ``out`` (a dict
        with the keys of ``head``) against ``target`` (``(B, S, G)`` with a ``(B, S)`` mask, or ``(B, G)`` for
        slide-level predictions with ``mask=None``). A dict return holds named parts and the ``"total"``.
    head
        Output head the loss needs from the model: ``"expr"`` (linear), ``"rate"`` (softplus rate, also
        written to ``"expr"``) or ``"zinb"`` (``"mu"``, ``"theta"``, ``"pi"``; ``"expr"`` the mean).
    counts
        ``True``: trained on raw integer counts and predicting counts; ``False``: trained on ``log1p``
        counts when ``log_transform`` (the default), predicting log1p counts.
    description
        One line shown by :func:`available_losses`.
    """

    name: str
    fn: Callable[..., torch.Tensor | dict]
    head: str = "expr"
    counts: bool = False
    description: str = ""

    @property
    def outputs(self) -> tuple[str, ...]:
        """Model outputs the loss reads."""
        return HEADS[self.head]


_LOSS_TABLE: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    fn: Callable[..., torch.Tensor | dict] | None = None,
    *,
    head: str = "expr",
    counts: bool = False,
    description: str = "",
):
    """Add a loss to the table (usable as ``stf.tl.fit(loss=name)`` by every model with that output head).

    Parameters
    ----------
    name
        Loss name.
    fn
        ``fn(out, target, mask, *, pcc_weight) -> Tensor`` (see :class:`LossSpec`); ``None`` returns a
        decorator.
    head
        ``"expr"``, ``"rate"`` or ``"zinb"`` (the outputs the model must produce, see :data:`HEADS`).
    counts
        Train on raw integer counts (never log-transformed) and predict counts.
    description
        One line shown by :func:`available_losses`.

    Returns
    -------
    ``fn`` (or, without ``fn``, a decorator registering the function it decorates).

    Examples
    --------
    >>> from spatialtranscriptformer.module import register_loss
    >>> @register_loss("l1", description="mean absolute error")
    ... def l1(out, target, mask, **_):
    ...     return masked_mean_abs(out["expr"] - target, mask)  # doctest: +SKIP
    """
    if head not in HEADS:
        raise ValueError(f"Loss {name!r}: head must be one of {list(HEADS)}, got {head!r}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"A loss name must be a non-empty string, got {name!r}.")

    def decorator(f: Callable[..., torch.Tensor | dict]) -> Callable[..., torch.Tensor | dict]:
        old = _LOSS_TABLE.get(name)
        if old is not None and old.fn is not f and (old.fn.__module__, old.fn.__qualname__) != (
            f.__module__, f.__qualname__
        ):
            raise ValueError(f"A loss named {name!r} is already registered (by {old.fn.__module__}).")
        _LOSS_TABLE[name] = LossSpec(name=name, fn=f, head=head, counts=bool(counts), description=description)
        return f

    return decorator if fn is None else decorator(fn)


def get_loss(name: str) -> LossSpec:
    """The table entry of loss ``name``; a ``ValueError`` lists the valid names otherwise."""
    if name not in _LOSS_TABLE:
        raise ValueError(f"Unknown loss {name!r}; valid losses: {list(_LOSS_TABLE)}.")
    return _LOSS_TABLE[name]


def available_losses() -> dict[str, str]:
    """The loss table: ``{name: description}``, built-in losses first."""
    return {k: v.description for k, v in _LOSS_TABLE.items()}


def target_space(loss: str, log_transform: bool) -> str:
    """``"counts"`` for count losses (or without ``log_transform``), else ``"log1p"``: what predictions are."""
    return "log1p" if (log_transform and not get_loss(loss).counts) else "counts"


register_loss("mse", lambda out, y, m, **_: masked_mse(out["expr"], y, m), description="mean squared error")
register_loss("pcc", lambda out, y, m, **_: pcc_loss(out["expr"], y, m),
              description="1 - Pearson r per gene across the spots of each slide (spatial pattern)")


@register_loss("mse_pcc", description="mse + pcc_weight * pcc (the design's composite loss)")
def _mse_pcc(out, y, m, *, pcc_weight: float = 1.0, **_):
    parts = {"mse": masked_mse(out["expr"], y, m), "pcc": pcc_loss(out["expr"], y, m)}
    return {**parts, "total": parts["mse"] + pcc_weight * parts["pcc"]}


register_loss("zinb", lambda out, y, m, **_: zinb_nll(y, out["mu"], out["theta"], out["pi"], m), head="zinb",
              counts=True, description="zero-inflated negative binomial NLL of raw counts")
register_loss("poisson", lambda out, y, m, **_: poisson_nll(out["rate"], y, m), head="rate", counts=True,
              description="Poisson NLL of raw counts")


__all__ = [
    "HEADS",
    "LOSSES",
    "LossSpec",
    "available_losses",
    "compute_loss",
    "get_loss",
    "masked_mean_over_spots",
    "masked_mse",
    "pathway_aux_loss",
    "pathway_structure_loss",
    "pcc_loss",
    "pearson_per_gene",
    "poisson_nll",
    "register_loss",
    "target_space",
    "zinb_nll",
]
