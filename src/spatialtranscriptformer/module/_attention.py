"""Quadrant attention over ``[pathways | patches]`` without an (S+P)^2 matrix.

The sequence holds P pathway tokens followed by S patch tokens. Four information flows can be switched
on or off (the SpatialTranscriptFormer design): ``p2p`` (pathways attend to pathways), ``p2h`` (pathways
attend to patches), ``h2p`` (patches attend to pathways) and ``h2h`` (patches attend to patches). A
token always attends to itself.

The fast path never builds a T x T tensor (T = P + S): pathway and patch queries are handled as two
groups, each attending over the concatenation of the key groups it may see with
:func:`torch.nn.functional.scaled_dot_product_attention` (fused flash / memory-efficient kernels, O(T)
memory). Padding is a boolean ``(B, 1, 1, K)`` key mask that SDPA broadcasts. When a query group may not
see its own group (``p2p`` or ``h2h`` off) it attends to the other group's keys plus its own key only;
that is computed exactly with explicit O(S·P) scores and the self score appended as one extra column
of the softmax (e.g. the pathway bottleneck, ``h2h`` off, costs O(S·P) time and memory).

Attention dropout is not used: on CPU it forces SDPA onto the math kernel that materialises the full
score matrix; dropout is applied to the residual branches instead (:class:`QuadrantEncoderLayer`).
``return_attention=True`` takes an explicit (slow, O(T^2)) path that returns the maps.

Training memory: when gradients are recorded, each layer keeps its input tokens instead of the
normalised ones (layer norm + the next linear map recomputed from them in the backward pass,
:func:`norm_linear`) and the feed-forward block keeps its hidden pre-activation instead of both it
and the GELU output (:func:`gelu_linear`): selective recomputation of cheap element-wise operations
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"), about a
third less activation memory for the same matrix products. ``activation_checkpointing=True``
(:class:`QuadrantEncoderLayer`) keeps only each layer's input and recomputes the whole layer in the
backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): less memory again,
about a third more compute.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

INTERACTIONS = ("p2p", "p2h", "h2p", "h2h")
"""Valid interaction (information-flow) names."""


def validate_interactions(interactions: Iterable[str] | str, n_layers: int) -> frozenset[str]:
    """Check interaction names and the bottleneck depth rule; return them as a frozenset.

    Parameters
    ----------
    interactions
        Enabled flows, a subset of :data:`INTERACTIONS` (``"all"`` for all four).
    n_layers
        Number of transformer layers; without ``h2h`` at least 2 are needed (layer 1: pathways gather
        from patches, layer 2: patches read the pathways).

    Returns
    -------
    The enabled interactions.
    """
    if isinstance(interactions, str):
        interactions = INTERACTIONS if interactions == "all" else (interactions,)
    got = [str(i) for i in interactions]
    bad = sorted(set(got) - set(INTERACTIONS))
    if bad:
        raise ValueError(f"Unknown interactions {bad}; valid interactions are {list(INTERACTIONS)}.")
    enabled = frozenset(got)
    if int(n_layers) < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
    if "h2h" not in enabled and n_layers < 2:
        raise ValueError(
            "Without 'h2h' (pathway bottleneck) patches communicate only through pathway tokens, which "
            f"needs n_layers >= 2; got n_layers={n_layers}."
        )
    return enabled


def _attend_with_self(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of ``q`` over keys ``k`` plus each query's own key (exact, O(Q·K))."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    s_self = (q * k_self).sum(-1, keepdim=True) * scale
    a = torch.softmax(torch.cat([s, s_self], dim=-1), dim=-1)
    return torch.matmul(a[..., :-1], v) + a[..., -1:] * v_self


class QuadrantAttention(nn.Module):
    """Multi-head self-attention over ``[pathways | patches]`` with switchable quadrants.

    Parameters
    ----------
    dim
        Token dimension.
    n_heads
        Number of heads (must divide ``dim``).
    interactions
        Enabled flows (validated with :func:`validate_interactions` by the caller).
    """

    def __init__(self, dim: int, n_heads: int, *, interactions: Iterable[str] = INTERACTIONS):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"token_dim ({dim}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.scale = self.head_dim**-0.5
        self.interactions = frozenset(interactions)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def allowed(self, n_pathways: int, key_mask: torch.Tensor) -> torch.Tensor:
        """Build the explicit ``(B, T, T)`` boolean map of which query may attend to which key."""
        B, S = key_mask.shape
        P, T = n_pathways, n_pathways + S
        dev = key_mask.device
        a = torch.zeros(T, T, dtype=torch.bool, device=dev)
        it = self.interactions
        a[:P, :P] = "p2p" in it
        a[:P, P:] = "p2h" in it
        a[P:, :P] = "h2p" in it
        a[P:, P:] = "h2h" in it
        valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=dev), key_mask.bool()], dim=1)
        eye = torch.eye(T, dtype=torch.bool, device=dev)
        return (a.unsqueeze(0) & valid.unsqueeze(1)) | eye

    def forward(
        self,
        x: torch.Tensor,
        n_pathways: int,
        key_mask: torch.Tensor,
        *,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend.

        Parameters
        ----------
        x
            ``(B, P + S, D)`` tokens, pathways first.
        n_pathways
            P.
        key_mask
            ``(B, S)`` boolean, ``True`` for real patches.
        return_attention
            Use the explicit path and return the ``(B, heads, T, T)`` map (disabled flows are 0).

        Returns
        -------
        The ``(B, T, D)`` output and the attention map (or ``None``).
        """
        return self.attend(self.qkv(x), n_pathways, key_mask, return_attention=return_attention)

    def attend(
        self, qkv: torch.Tensor, n_pathways: int, key_mask: torch.Tensor, *, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` from the ``(B, T, 3 D)`` output of :attr:`qkv` (computed by the caller)."""
        B, T, D3 = qkv.shape
        D = D3 // 3
        P = n_pathways
        H, d = self.n_heads, self.head_dim
        q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d)
        if return_attention:
            allowed = self.allowed(P, key_mask)
            s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            attn = torch.softmax(s.masked_fill(~allowed.unsqueeze(1), float("-inf")), dim=-1)
            out = torch.matmul(attn, v)
        else:
            attn = None
            out = self._fast(q, k, v, P, key_mask)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj(out), attn

    def _fast(self, q, k, v, P: int, key_mask: torch.Tensor) -> torch.Tensor:
        it = self.interactions
        B = q.shape[0]
        sdpa = F.scaled_dot_product_attention
        # a key-padding mask only where some spot is padding (SDPA broadcasts (B,1,1,K) without a K×K)
        pad = None if bool(key_mask.all()) else key_mask.bool()[:, None, None, :]
        full = None
        if pad is not None:
            ones = torch.ones(B, 1, 1, P, dtype=torch.bool, device=q.device)
            full = torch.cat([ones, pad], dim=-1)
        if it == frozenset(INTERACTIONS):
            return sdpa(q, k, v, attn_mask=full, scale=self.scale)
        qp, qh = q[:, :, :P], q[:, :, P:]
        kp, kh = k[:, :, :P], k[:, :, P:]
        vp, vh = v[:, :, :P], v[:, :, P:]
        # pathway queries
        if "p2p" in it and "p2h" in it:
            op = sdpa(qp, k, v, attn_mask=full, scale=self.scale)
        elif "p2p" in it:
            op = sdpa(qp, kp, vp, scale=self.scale)
        elif "p2h" in it:
            op = _attend_with_self(qp, kh, vh, pad, kp, vp, self.scale)
        else:
            op = vp
        # patch queries
        if "h2h" in it and "h2p" in it:
            oh = sdpa(qh, k, v, attn_mask=full, scale=self.scale)
        elif "h2h" in it:
            oh = sdpa(qh, kh, vh, attn_mask=pad, scale=self.scale)
        elif "h2p" in it:
            oh = _attend_with_self(qh, kp, vp, None, kh, vh, self.scale)
        else:
            oh = vh
        return torch.cat([op, oh], dim=2)


class _NormLinear(torch.autograd.Function):
    """``linear(layer_norm(x))`` that saves ``x`` and the norm's statistics, not the normalised tokens."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias):  # noqa: D102
        xn, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, mean, rstd, ln_weight, ln_bias, weight)
        return F.linear(xn, weight, bias)  # low precision under autocast, as nn.Linear would be

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
        need_x, need_lw, need_lb, _, need_w, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = grad_b = None
        if need_w:
            xn = (x - mean) * rstd * ln_weight + ln_bias  # recomputed
            grad_w = (g2.t() @ xn.reshape(-1, xn.shape[-1]).to(g.dtype)).to(weight.dtype)
        if need_b:
            grad_b = g2.sum(0).to(weight.dtype)
        gx = glw = glb = None
        if need_x or need_lw or need_lb:
            grad_xn = (g @ weight.to(g.dtype)).to(x.dtype)
            gx, glw, glb = torch.ops.aten.native_layer_norm_backward(
                grad_xn, x, (x.shape[-1],), mean, rstd, ln_weight, ln_bias, [need_x, need_lw, need_lb]
            )
        return gx, glw, glb, None, grad_w, grad_b


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h))`` that saves ``h`` only (the GELU output is recomputed in the backward pass)."""

    @staticmethod
    def forward(ctx, h, weight, bias):  # noqa: D102
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        h, weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = grad_b = grad_h = None
        if need_w:
            a = F.gelu(h).to(g.dtype)
            grad_w = (g2.t() @ a.reshape(-1, a.shape[-1])).to(weight.dtype)
        if need_b:
            grad_b = g2.sum(0).to(weight.dtype)
        if need_h:
            grad_h = torch.ops.aten.gelu_backward((g @ weight.to(g.dtype)).to(h.dtype), h)
        return grad_h, grad_w, grad_b


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """``linear(norm(x))``; while gradients are recorded, keeps ``x`` rather than ``norm(x)`` for backward."""
    if not torch.is_grad_enabled():
        return linear(norm(x))
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def gelu_linear(h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(gelu(h))``; while gradients are recorded, keeps ``h`` rather than both ``h`` and ``gelu(h)``."""
    if not torch.is_grad_enabled():
        return linear(F.gelu(h))
    return _GeluLinear.apply(h, linear.weight, linear.bias)


def residual_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout whose saved mask is boolean (1 byte per element instead of 4).

    :func:`torch.nn.functional.dropout` on CPU keeps a float noise tensor for the backward pass; this
    keeps only the boolean keep-mask, which matters at tens of thousands of tokens.
    """
    if not training or p == 0.0:
        return x
    keep = torch.rand_like(x) >= p
    return x * keep * (1.0 / (1.0 - p))


class QuadrantEncoderLayer(nn.Module):
    """Pre-norm transformer layer (Xiong et al. 2020) with :class:`QuadrantAttention`.

    ``x = x + Dropout(Attn(LN(x)))``; ``x = x + Dropout(FFN(LN(x)))`` with a GELU FFN of width
    ``ffn_mult * dim``. Dropout is applied to the output of each sub-layer before the residual addition
    (Vaswani et al. 2017, §5.4), not inside the FFN or on attention probabilities.

    Parameters
    ----------
    dim
        Token dimension.
    n_heads
        Attention heads.
    interactions
        Enabled flows.
    dropout
        Dropout probability on the sub-layer outputs.
    ffn_mult
        FFN width multiplier.
    activation_checkpointing
        In training, keep only the layer's input and recompute the layer in the backward pass
        (:func:`torch.utils.checkpoint.checkpoint`, same dropout masks): less memory, more compute.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        interactions: Iterable[str] = INTERACTIONS,
        dropout: float = 0.1,
        ffn_mult: int = 4,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QuadrantAttention(dim, n_heads, interactions=interactions)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.dropout = float(dropout)
        self.activation_checkpointing = bool(activation_checkpointing)

    def forward(
        self, x: torch.Tensor, n_pathways: int, key_mask: torch.Tensor, *, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the layer; returns the tokens and the attention map (or ``None``)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled() and not return_attention:
            return checkpoint(self._tokens, x, n_pathways, key_mask, use_reentrant=False), None
        if return_attention:
            a, attn = self.attn(self.norm1(x), n_pathways, key_mask, return_attention=True)
            x = x + residual_dropout(a, self.dropout, self.training)
            x = x + residual_dropout(self.ffn(self.norm2(x)), self.dropout, self.training)
            return x, attn
        return self._tokens(x, n_pathways, key_mask), None

    def _tokens(self, x: torch.Tensor, n_pathways: int, key_mask: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn.attend(norm_linear(x, self.norm1, self.attn.qkv), n_pathways, key_mask)
        x = x + residual_dropout(a, self.dropout, self.training)
        h = norm_linear(x, self.norm2, self.ffn[0])
        return x + residual_dropout(gelu_linear(h, self.ffn[2]), self.dropout, self.training)
