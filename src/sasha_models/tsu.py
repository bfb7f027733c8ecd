"""TSU — the targeted state updater.

When the agent zooms into patch ``a`` it learns ``v_a``; every not-yet-updated patch ``j``
whose low-resolution feature is nearly collinear with ``z_a`` (``|cos(z_j, z_a)| >= tau``) is
given ``TSU([v_a, z_a, z_j])`` as its new state row. The TSU is an MLP
``3d -> 2d -> d`` with GELU and an output LayerNorm, trained with MSE to predict ``v_j``
(official code: ``modules/fglobal_mlp.py`` ``FGlobal(ip_dim=3*384, hidden_dim=768,
op_dim=384)`` and ``step5_tsu_training.py``). :func:`calibrate_tau` picks τ for a backbone
whose features the paper's τ does not suit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # data.py imports Lightning (and this module)
    from .data import BagSource

__all__ = ["TSU", "TSUConfig", "calibrate_tau", "similar_mask", "sample_tsu_pairs"]


@dataclass
class TSUConfig:
    """TSU architecture and training settings.

    Defaults follow the official CAMELYON16 settings at 6385fe6
    (``config/camelyon_tsu_config.yml``, ``modules/fglobal_mlp.py``, ``step5_tsu_training.py``)
    except where an attribute says otherwise:

    Attributes:
        d: feature size d (ViT-S/16: 384).
        d_hidden: hidden width; ``None`` = 2d (official 768 = 2 × 384).
        tau: cosine threshold for "similar" patches (``cosine_threshold: 0.95``; TCGA 0.92).
        n_anchors: anchor patches sampled per slide per training step (official: 1).
        anchor_in_target: the anchor is one of its own targets, as in the official step
            (``step5_tsu_training.py``: its ``|cos| >= tau`` set always holds the anchor, so
            a step is never empty; ``[v_a, z_a, z_a] -> v_a`` is one of the pairs). ``False``
            (ours, the default) trains only on the other similar patches, the only rows the
            environment ever updates; a slide without one gives a zero-loss step.
        validation: ``"fixed"`` (ours, the default): ``n_val_anchors`` anchors per val slide
            drawn once from the seed, loss pooled over every pair (a steady number to select
            on). ``"official"`` (step5 ``evaluate``): one fresh random anchor per val slide at
            every validation, loss = mean over slides of each slide's MSE (with the anchor in
            its target set when ``anchor_in_target``).
        n_val_anchors: anchors per val slide of ``validation="fixed"``.
        lr: AdamW learning rate after the per-iteration cosine schedule overrides the
            optimiser's initial value (``lr: 0.00004``; TCGA 0.0003).
        weight_decay: AdamW weight decay (``reg: 0.0004``; TCGA 0.005).
        max_epochs: epochs over the training slides (default 100). The official code at
            6385fe6 trains one TSU per budget, ``train_epoch: 1000`` for f = 0.2 and 200 for
            f = 0.1 (the value commented out beside it): the pipeline's ``tsu.budgets``
            section does the same (the ``paper`` preset).
        residual: ``False`` (paper): ``LayerNorm(MLP([v_a, z_a, z_j]))``, which suits
            layer-normalised ViT features. ``True``: ``z_j + MLP([v_a, z_a, z_j])`` without the
            output LayerNorm, last layer zero-initialised so training starts at the identity
            baseline — for features that are not layer-normalised (e.g. pooled CNN features,
            whose rows differ in scale, which an output LayerNorm cannot reproduce).
        anchor: which row of a zoomed patch a the environment compares and feeds to the TSU:
            ``"state"`` (official code: the current state row ``S[a]``) or ``"lowres"`` (paper
            text and training pairs: ``z_a``); see :class:`sasha_env.envs.wsi.SashaWSIEnv`.
            Stored with the weights so every env built from this TSU applies it the same way.
        freeze_covered: the environment's state freezes once every patch is zoomed or
            TSU-updated (official ``envs/WSI_cosine_env.py``: further actions are ignored, the
            reward is still −CE of the state); ``False`` (the default) keeps zooming. An
            environment setting stored with the TSU, like ``anchor``, so every env built from
            a workdir (training, evaluation, ``sasha predict``) applies it.
    """

    d: int = 384
    d_hidden: int | None = None
    tau: float = 0.95
    n_anchors: int = 1
    anchor_in_target: bool = False
    validation: str = "fixed"
    n_val_anchors: int = 8
    lr: float = 4e-5
    weight_decay: float = 4e-4
    max_epochs: int = 100
    residual: bool = False
    anchor: str = "state"
    freeze_covered: bool = False

    def __post_init__(self) -> None:
        if self.validation not in ("fixed", "official"):
            raise ValueError(
                f"TSU validation must be 'fixed' or 'official', got {self.validation!r}"
            )
        if self.n_val_anchors < 1:
            raise ValueError(f"TSU n_val_anchors must be >= 1, got {self.n_val_anchors}")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TSUConfig:
        return cls(**d)


class TSU(nn.Module):
    """MLP ``[v_a, z_a, z_j] (3d) -> 2d -> d``, GELU, output LayerNorm (or residual, see config).

    Shapes:
        ``forward(v_a: (..., d), z_a: (..., d), z_j: (..., d)) -> (..., d)``; the three inputs
        broadcast against each other, e.g. one anchor ``(d,)`` with many targets ``(n, d)``.
    """

    def __init__(self, cfg: TSUConfig | int | None = None) -> None:
        super().__init__()
        if cfg is None or isinstance(cfg, int):
            cfg = TSUConfig() if cfg is None else TSUConfig(d=cfg)
        self.cfg = cfg
        d, hidden = cfg.d, cfg.d_hidden or 2 * cfg.d
        head = nn.Linear(hidden, d)
        if cfg.residual:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        out_norm = nn.Identity() if cfg.residual else nn.LayerNorm(d)
        self.net = nn.Sequential(nn.Linear(3 * d, hidden), nn.GELU(), head, out_norm)

    @property
    def d_in(self) -> int:
        return self.cfg.d

    def forward(self, v_a: Tensor, z_a: Tensor, z_j: Tensor) -> Tensor:
        if v_a.ndim == z_a.ndim == 1 and z_j.ndim > 1:
            out = self._one_anchor(v_a, z_a, z_j)
        else:
            v_a, z_a, z_j = torch.broadcast_tensors(v_a, z_a, z_j)
            out = self.net(torch.cat([v_a, z_a, z_j], dim=-1))
        return z_j + out if self.cfg.residual else out

    def forward_anchors(self, v_a: Tensor, z_a: Tensor, z_j: Tensor, owner: Tensor) -> Tensor:
        """Several zooms' updates as one product: row i of ``z_j`` is a target of anchor
        ``owner[i]``.

        Equals ``self(v_a[owner[i]], z_a[owner[i]], z_j[i])`` row by row, to float rounding
        (batched products round differently in the last bits); the anchors' part of the first
        layer is computed once per anchor, as in a single zoom.

        Args:
            v_a, z_a: the anchors ``(A, d)``.
            z_j: the targets ``(R, d)``.
            owner: ``(R,)`` int64, each target's anchor in ``[0, A)``.

        Returns:
            ``(R, d)``.
        """
        first, d = cast(nn.Linear, self.net[0]), self.cfg.d
        anchor = F.linear(torch.cat([v_a, z_a], dim=-1), first.weight[:, : 2 * d], first.bias)
        out = self._targets(z_j, anchor[owner])
        return z_j + out if self.cfg.residual else out

    def _one_anchor(self, v_a: Tensor, z_a: Tensor, z_j: Tensor) -> Tensor:
        """One anchor ``(d,)``, many targets ``(..., d)`` (a zoom's update): the anchor's part
        of the first layer, ``W_v v_a + W_a z_a + b``, is computed once instead of per target,
        a third of the first layer's work per target instead of all of it."""
        first, d = cast(nn.Linear, self.net[0]), self.cfg.d
        w = first.weight  # (hidden, 3d): columns for v_a, z_a, z_j
        anchor = torch.addmv(first.bias, w[:, : 2 * d], torch.cat([v_a, z_a]))
        return self._targets(z_j, anchor)

    def _targets(self, z_j: Tensor, anchor: Tensor) -> Tensor:
        """The network after its first layer's anchor part ``anchor`` (broadcast to the
        targets' rows) is known: the targets' part ``W_j z_j`` added, then the rest."""
        first, d = cast(nn.Linear, self.net[0]), self.cfg.d
        return self.net[1:](F.linear(z_j, first.weight[:, 2 * d :]) + anchor)


def similar_mask(z: Tensor, anchor: int | Tensor, tau: float) -> Tensor:
    """Rows similar to the anchor row: ``|cos(z_j, z_anchor)| >= tau``.

    Args:
        z: low-resolution features ``(N, d)``.
        anchor: an index into the rows of ``z``.
        tau: cosine threshold.

    Returns:
        bool ``(N,)``; the anchor itself is included (the caller excludes it if needed).
    """
    cos = F.cosine_similarity(z, z[anchor].unsqueeze(0), dim=-1)
    return cos.abs() >= tau


def sample_tsu_pairs(
    z: Tensor,
    v: Tensor,
    tau: float,
    generator: torch.Generator | None = None,
    n_anchors: int = 1,
    include_anchor: bool = False,
    anchors: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw TSU training pairs from one slide.

    Picks ``min(n_anchors, N)`` distinct random anchors ``a``; for each, every ``j != a`` with
    ``|cos(z_j, z_a)| >= tau`` gives one pair (and ``j = a`` too with ``include_anchor``, as
    the official ``step5_tsu_training.py`` does; targets in row order).

    Args:
        z: low-resolution features ``(N, d)``.
        v: distilled features ``(N, d)``.
        tau: cosine threshold.
        generator: optional torch RNG.
        n_anchors: anchors per call.
        include_anchor: the anchor is one of its own targets.
        anchors: the anchor rows ``(A,)`` to use instead of random ones (``generator`` and
            ``n_anchors`` are then unused).

    Returns:
        ``(v_a, z_a, z_j, v_j)``, each ``(P, d)``; P may be 0 when no patch is similar enough
        (never with ``include_anchor``).
    """
    if z.shape != v.shape or z.ndim != 2:
        raise ValueError(f"z and v must both be (N, d), got {tuple(z.shape)}, {tuple(v.shape)}")
    n = z.shape[0]
    if anchors is None:
        anchors = torch.randperm(n, generator=generator)[: max(0, min(n_anchors, n))]
    idx_a, idx_j = [], []
    for a in anchors.tolist():
        sim = similar_mask(z, a, tau)
        sim[a] = include_anchor
        targets = sim.nonzero().squeeze(-1)
        idx_a.append(torch.full_like(targets, a))
        idx_j.append(targets)
    if idx_a:
        ia, ij = torch.cat(idx_a), torch.cat(idx_j)
    else:
        ia = ij = torch.zeros(0, dtype=torch.long)
    ia, ij = ia.to(z.device), ij.to(z.device)
    return v[ia], z[ia], z[ij], v[ij]


def calibrate_tau(
    bags: BagSource, quantile: float, seed: int, n_slides: int = 32, max_pairs: int = 1 << 16
) -> float:
    """A TSU threshold for this backbone: the ``quantile`` of |cos| between low-res patches.

    The paper's τ = 0.95 suits its DINO ViT-S features; other backbones (e.g. post-ReLU CNN
    features, whose cosines are all high) need their own. With quantile q an anchor has on
    average (1 - q)·N similar patches.

    Memory stays ``O(max_pairs + N·d)`` per slide: a slide with at most ``max_pairs`` ordered
    pairs ``(i, j), i ≠ j`` uses all of them (N ≤ 256 by default, the exact quantile), a
    larger one ``max_pairs`` pairs drawn uniformly, never the N × N matrix (8192² cosines are
    256 MiB in float32, several times that in the copies a quantile makes). With M sampled
    pairs in all, the returned τ's quantile level among all pairs is within about
    ``3·sqrt(q(1 − q)/M)`` of q (±0.0003 for q = 0.98 over 32 large slides).

    Args:
        bags: the slides; only ``slide_ids("train")`` and ``features(slide_id, "lowres")``
            (``(N, d)``) are read.
        quantile: q, in [0, 1].
        seed: seeds which (at most ``n_slides``) training slides and which pairs are used.
        n_slides: training slides read, drawn at random when there are more.
        max_pairs: pairs sampled per slide that has more ordered pairs than this.

    Returns:
        τ, a cosine in [0, 1].
    """
    rng = np.random.default_rng(seed)
    ids = bags.slide_ids("train")
    ids = [ids[i] for i in rng.permutation(len(ids))[:n_slides]]
    sims = []
    for sid in ids:
        z = torch.from_numpy(bags.features(sid, "lowres")).float()
        z = F.normalize(z, dim=1)
        n = len(z)
        if n * (n - 1) <= max_pairs:  # every ordered pair
            c = (z @ z.T).abs()
            off = ~torch.eye(n, dtype=torch.bool)
            sims.append(c[off].numpy())
        else:  # uniform pairs i != j: j drawn from the n - 1 others
            i = torch.from_numpy(rng.integers(0, n, max_pairs))
            j = torch.from_numpy(rng.integers(0, n - 1, max_pairs))
            j += (j >= i).long()
            sims.append((z[i] * z[j]).sum(dim=1).abs().numpy())
    return float(np.quantile(np.concatenate(sims), quantile))
