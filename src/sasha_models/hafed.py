"""HAFED — the hierarchical attention-based feature distiller and slide classifier.

Two levels of gated attention (SASHA, arXiv 2507.05077, Sec. 3):

* **Level 1** (:meth:`HAFED.distill`): for each low-resolution patch, gated attention over its
  k high-resolution sub-patches gives weights; the distilled vector ``v_i`` is the weighted
  sum of the *raw* sub-patch features, so ``v`` lives in the backbone's own d-dimensional
  space, the same space as the low-resolution features ``z``. This is what lets the agent's
  state mix rows of ``z`` and ``v`` (official code: ``HAFED.forward`` with
  ``dim_reduction: False``; ``afeat_1 = A_1 @ feat``, d = D_feat = 384).
* **Level 2** (:class:`AttentionMILClassifier`): M-branch gated attention over the N patch
  rows of a state S (N × d). Each branch pools the rows with its own attention and has its own
  linear head; the slide head classifies the rows pooled with the branch-averaged attention.

Level 2 is written as ``classify = pool ∘ instance_scores`` where :meth:`instance_scores`
depends on each row alone and :meth:`pool` is cheap, so an environment that changes a few rows
of S per step re-scores only those rows. Use eval mode for that: in train mode ``pool`` drops
random top-K rows and dropout (if any) makes scores random.

Training follows ACMIL (Zhang et al., CVPR 2024) as the official SASHA code does: slide
cross-entropy + per-branch cross-entropy + a diversity loss, with stochastic top-K instance
masking at both levels while training. Eval mode is deterministic. Our diversity loss is
ACMIL's, the mean pairwise cosine similarity between branch attention maps; the official
``step3_WSI_classification_HAFED.py`` at 6385fe6 indexes its ``(5, N)`` attention by column,
so its term compares the attention of patches 0–4 across branches instead (the fidelity
table in ``docs/agents.md``).

The same level-2 classifier trained on low-resolution features alone is the ``lowres_only``
benchmark row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import GatedAttention, masked_softmax, random_topk_mask

__all__ = [
    "HAFED",
    "AttentionMILClassifier",
    "HAFEDConfig",
    "acmil_loss",
    "diversity_loss",
    "hafed_loss",
    "partial_state",
]


#: Which rows of a partial state keep their distilled v (:attr:`HAFEDConfig.partial_rows`).
PARTIAL_ROWS = ("random", "attended")


@dataclass
class HAFEDConfig:
    """HAFED architecture, loss and optimisation settings.

    Defaults are the paper's CAMELYON16 settings as released in the official repository
    (``coglabiisc/SASHA``, ``config/camelyon_config.yml`` and ``architecture/transformer.py``):

    Attributes:
        d_in: feature size d of the backbone (ViT-S/16 DINO: ``D_feat: 384``).
        n_classes: number of slide classes (``n_class: 2``); any value >= 2 works.
        d_hidden: hidden size of the gated attention layers (``Attention_Gated(D=128)``).
        n_branches: level-2 attention branches M (``n_token_2: 5``; TCGA config uses 1).
        n_branches_l1: level-1 attention branches (``n_token_1: 1``).
        top_k: level-2 top-K instances eligible for random masking (``n_masked_patch_2: 20``).
        top_k_l1: level-1 top-K sub-patches eligible for masking (``n_masked_patch_1: 10``).
        mask_drop: fraction of the top-K dropped while training (``mask_drop: 0.24``;
            TCGA 0.4).
        dropout: dropout before the linear heads and in the gated attention
            (official ``droprate=0``).
        w_slide, w_branch, w_div: loss weights; the official training script sums the three
            terms with weight 1 (``loss = diff_loss_1 + diff_loss_2 + loss0 + loss1``).
        lr: AdamW learning rate (``lr: 0.000414``; TCGA 0.0004), half-cycle cosine to 0.
        weight_decay: AdamW weight decay (``wd: 0.00001``; TCGA 0.0001).
        max_epochs: training epochs (``train_epoch: 50``), batch size 1 slide.
        partial_states: probability that a training bag's level-2 input is a *partial state*
            (:func:`partial_state`: a share c ~ U(0, 1) of its rows keep their distilled v, the
            others are the slide's low-res rows z), the kind of state a reading leaves and
            the agents' reward and final prediction are computed on. 0 (the official setting):
            level 2 sees only full high-resolution bags. Not in the paper.
        partial_rows: which rows of a partial state keep v: ``"random"`` (each with
            probability c) or ``"attended"`` (the ⌈c·N⌉ rows level 2 attends to most on the
            full bag, as a reader guided by HAFED's attention would zoom them).
        row_norm: layer-normalise each state row (learned gain and bias) before level 2's
            attention and values, so that a row's norm cannot outweigh the rest of a state
            (a distilled v row among low-res z rows). False (the official setting): level 2
            reads the raw rows. Not in the paper.
    """

    d_in: int = 384
    n_classes: int = 2
    d_hidden: int = 128
    n_branches: int = 5
    n_branches_l1: int = 1
    top_k: int = 20
    top_k_l1: int = 10
    mask_drop: float = 0.24
    dropout: float = 0.0
    w_slide: float = 1.0
    w_branch: float = 1.0
    w_div: float = 1.0
    lr: float = 4.14e-4
    weight_decay: float = 1e-5
    max_epochs: int = 50
    partial_states: float = 0.0
    partial_rows: str = "random"
    row_norm: bool = False

    def __post_init__(self) -> None:
        if self.partial_rows not in PARTIAL_ROWS:
            raise ValueError(
                f"partial_rows must be one of {', '.join(PARTIAL_ROWS)}, got {self.partial_rows!r}"
            )
        if not 0.0 <= self.partial_states <= 1.0:
            raise ValueError(f"partial_states must be in [0, 1], got {self.partial_states}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.n_branches < 1 or self.n_branches_l1 < 1:
            raise ValueError("n_branches and n_branches_l1 must be >= 1")
        if not 0.0 <= self.mask_drop < 1.0:
            raise ValueError(f"mask_drop must be in [0, 1), got {self.mask_drop}")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HAFEDConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**d)


class AttentionMILClassifier(nn.Module):
    """M-branch gated-attention MIL classifier: HAFED's level 2, also usable on its own.

    Per-row values are the raw rows (official ``dim_reduction: False``), so ``D_h = d_in``;
    with ``row_norm`` each row is layer-normalised first and the attention and values are
    computed on the normalised row.

    Args:
        d_in: row feature size d.
        n_classes: number of classes C (>= 2).
        d_hidden: gated attention hidden size.
        n_branches: number of attention branches M; with M = 1 the single branch *is* the slide
            head and no extra branch head is built.
        top_k, mask_drop: ACMIL random top-K masking, applied only in training mode.
        dropout: dropout in the attention gate and before the heads.
        row_norm: layer-normalise each row (``nn.LayerNorm(d_in)``) before attention and values.

    Shapes (a leading batch axis ``B`` is optional everywhere, with ``valid`` as padding mask):
        ``instance_scores(S: (B, N, d)) -> a (B, N, M), h (B, N, d)``
        ``pool(a, h, valid: (B, N) | None) -> slide (B, C), branch (B, M, C), attn (B, M, N)``
    """

    def __init__(
        self,
        d_in: int,
        n_classes: int,
        d_hidden: int = 128,
        n_branches: int = 5,
        top_k: int = 20,
        mask_drop: float = 0.24,
        dropout: float = 0.0,
        row_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.d_in, self.n_classes, self.n_branches = d_in, n_classes, n_branches
        self.top_k, self.mask_drop = top_k, mask_drop
        self.row_norm: nn.Module = nn.LayerNorm(d_in) if row_norm else nn.Identity()
        self.attention = GatedAttention(d_in, d_hidden, n_branches, dropout)
        self.head_dropout = nn.Dropout(dropout)
        self.slide_head = nn.Linear(d_in, n_classes)
        self.branch_heads = nn.ModuleList(
            nn.Linear(d_in, n_classes) for _ in range(n_branches if n_branches > 1 else 0)
        )

    def instance_scores(self, S: Tensor) -> tuple[Tensor, Tensor]:
        """Row-wise part of the classifier: attention logits and values of each row.

        Args:
            S: state rows ``(..., N, d)``.

        Returns:
            ``a``: attention logits ``(..., N, M)``; ``h``: per-row values ``(..., N, d)``.
            Row i of both depends on row i of ``S`` only.
        """
        h = self.row_norm(S)
        return self.attention(h), h

    def pool(
        self, a: Tensor, h: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Cheap set-level part: masked softmax over rows, pooled features, heads.

        Args:
            a: attention logits ``(..., N, M)`` from :meth:`instance_scores`.
            h: values ``(..., N, D_h)`` from :meth:`instance_scores`.
            valid: bool ``(..., N)``, True for real rows; ``None`` = all valid.

        Returns:
            ``slide_logits (..., C)``, ``branch_logits (..., M, C)`` and the attention
            ``(..., M, N)`` (exactly 0 on invalid or dropped rows).
        """
        logits = a.transpose(-1, -2)  # (..., M, N)
        mask = None if valid is None else valid.to(torch.bool).unsqueeze(-2)
        if self.training and self.top_k > 0 and self.mask_drop > 0:
            mask = random_topk_mask(logits, mask, self.top_k, self.mask_drop)
        attn = masked_softmax(logits, mask, dim=-1)
        branch_feat = self.head_dropout(attn @ h)  # (..., M, D_h)
        slide_feat = self.head_dropout(attn.mean(-2, keepdim=True) @ h).squeeze(-2)
        slide_logits = self.slide_head(slide_feat)
        if self.branch_heads:
            branch_logits = torch.stack(
                [head(branch_feat[..., i, :]) for i, head in enumerate(self.branch_heads)],
                dim=-2,
            )
        else:
            branch_logits = slide_logits.unsqueeze(-2)
        return slide_logits, branch_logits, attn

    def classify(self, S: Tensor, valid: Tensor | None = None) -> Tensor:
        """Slide logits ``(..., C)`` of state ``S (..., N, d)``: ``pool(*instance_scores(S))``."""
        return self.pool(*self.instance_scores(S), valid)[0]

    @torch.no_grad()
    def fold_temperature(self, temperature: float) -> None:
        """Temperature scaling folded into the model: divide every head's weight and bias by
        ``temperature`` T in place, so that :meth:`classify` returns the logits / T.

        The attention is untouched, so the ranking of slides (AUC) and the attention over
        patches stay the same; T < 1 sharpens the probabilities, T > 1 softens them.
        """
        if not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        for head in (self.slide_head, *self.branch_heads):
            head.weight.div_(temperature)
            head.bias.div_(temperature)

    def forward(self, S: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        """Everything :func:`acmil_loss` needs.

        Returns:
            dict with ``slide_logits (..., C)``, ``branch_logits (..., M, C)`` and
            ``attention (..., M, N)``.
        """
        slide, branch, attn = self.pool(*self.instance_scores(S), valid)
        return {"slide_logits": slide, "branch_logits": branch, "attention": attn}


class HAFED(nn.Module):
    """Hierarchical attention-based feature distiller (SASHA, Sec. 3).

    Args:
        cfg: :class:`HAFEDConfig`.

    Shapes (leading batch axis optional):
        ``distill(hi: (N, k, d), sub_mask: (N, k) | None) -> v (N, d)``
        ``instance_scores(S: (N, d)) -> a (N, M), h (N, d)``
        ``pool(a, h, valid: (N,)) -> slide (C,), branch (M, C), attention (M, N)``
        ``classify(S, valid) -> slide logits (C,)``
        ``forward(hi: (N, k, d), valid: (N,)) -> dict`` (see :meth:`forward`)
    """

    def __init__(self, cfg: HAFEDConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or HAFEDConfig()
        self.level1 = GatedAttention(cfg.d_in, cfg.d_hidden, cfg.n_branches_l1, cfg.dropout)
        self.level2 = AttentionMILClassifier(
            cfg.d_in,
            cfg.n_classes,
            d_hidden=cfg.d_hidden,
            n_branches=cfg.n_branches,
            top_k=cfg.top_k,
            mask_drop=cfg.mask_drop,
            dropout=cfg.dropout,
            row_norm=cfg.row_norm,
        )

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    # ----------------------------------------------------------------- level 1
    def distill_with_attention(
        self, hi: Tensor, sub_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Level 1 with its attention map.

        Args:
            hi: high-resolution sub-patch features ``(..., N, k, d)``.
            sub_mask: bool ``(..., N, k)``, True for real sub-patches; ``None`` = all real.

        Returns:
            ``v (..., N, d)`` — per patch, the attention-weighted sum of its raw sub-patch
            features (0 for a patch with no valid sub-patch) — and the level-1 attention
            ``(..., N, M1, k)``.
        """
        logits = self.level1(hi).transpose(-1, -2)  # (..., N, M1, k)
        mask = None if sub_mask is None else sub_mask.to(torch.bool).unsqueeze(-2)
        if self.training and self.cfg.top_k_l1 > 0 and self.cfg.mask_drop > 0:
            mask = random_topk_mask(logits, mask, self.cfg.top_k_l1, self.cfg.mask_drop)
        attn = masked_softmax(logits, mask, dim=-1)
        v = (attn.mean(-2, keepdim=True) @ hi).squeeze(-2)  # (..., N, d)
        return v, attn

    def distill(self, hi: Tensor, sub_mask: Tensor | None = None) -> Tensor:
        """Distilled features ``v (..., N, d)`` from ``hi (..., N, k, d)``; see above."""
        return self.distill_with_attention(hi, sub_mask)[0]

    # ----------------------------------------------------------------- level 2
    def instance_scores(self, S: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`AttentionMILClassifier.instance_scores`."""
        return self.level2.instance_scores(S)

    def pool(
        self, a: Tensor, h: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """See :meth:`AttentionMILClassifier.pool`."""
        return self.level2.pool(a, h, valid)

    def classify(self, S: Tensor, valid: Tensor | None = None) -> Tensor:
        """Slide logits ``(..., C)`` of a state ``S (..., N, d)`` (rows of z and/or v)."""
        return self.level2.classify(S, valid)

    def fold_temperature(self, temperature: float) -> None:
        """See :meth:`AttentionMILClassifier.fold_temperature` (level 1 is untouched, so the
        distilled features ``v`` stay the same)."""
        self.level2.fold_temperature(temperature)

    def forward(
        self,
        hi: Tensor,
        valid: Tensor | None = None,
        sub_mask: Tensor | None = None,
        lowres: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Distil then classify, for training on full high-resolution features.

        Args:
            hi: ``(..., N, k, d)``; valid: ``(..., N)`` bool; sub_mask: ``(..., N, k)`` bool.
            lowres: the slides' low-res rows ``z (..., N, d)``; in training mode with
                ``cfg.partial_states > 0``, level 2 classifies a :func:`partial_state` of
                ``v`` and ``z`` instead of ``v`` for that share of the bags (``v`` returned
                is always the full distillation).

        Returns:
            dict with ``v (..., N, d)``, ``attention_l1 (..., N, M1, k)``,
            ``slide_logits (..., C)``, ``branch_logits (..., M, C)``,
            ``attention (..., M, N)``.
        """
        v, attn1 = self.distill_with_attention(hi, sub_mask)
        S = v
        if self.training and lowres is not None and self.cfg.partial_states > 0:
            scores = None
            if self.cfg.partial_rows == "attended":
                with torch.no_grad():  # the full bag's mean attention logit per row
                    scores = self.level2.instance_scores(v)[0].mean(-1)
                    if valid is not None:
                        scores = scores.masked_fill(~valid.to(torch.bool), float("-inf"))
            S = partial_state(v, lowres, self.cfg.partial_states, scores=scores)
        out = self.level2(S, valid)
        out.update(v=v, attention_l1=attn1)
        return out


def partial_state(
    v: Tensor,
    z: Tensor,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    scores: Tensor | None = None,
) -> Tensor:
    """A random state of the kind a partial reading leaves: per bag, with probability ``p``,
    each row keeps its distilled ``v`` with probability c ~ U(0, 1) (one c per bag) and is the
    low-res ``z`` otherwise; the other bags stay ``v``. With ``scores``, the rows kept are
    instead the ⌈c·n⌉ highest-scored (n: the bag's rows with a finite score).

    Args:
        v: distilled high-res rows ``(..., N, d)``; z: low-res rows, the same shape.
        p: share of the bags made partial.
        generator: torch RNG (default: the global one).
        scores: ``(..., N)`` per-row scores (``-inf`` for padding), or ``None``.

    Returns:
        ``S (..., N, d)``: rows of ``v`` and ``z``.
    """
    if v.shape != z.shape:
        raise ValueError(
            f"v and z must have the same shape, got {tuple(v.shape)} and {tuple(z.shape)}"
        )
    lead, dev = v.shape[:-2], v.device
    partial = torch.rand(lead, device=dev, generator=generator) < p  # (...)
    share = torch.rand(lead, device=dev, generator=generator)  # (...)
    if scores is None:
        keep = torch.rand(v.shape[:-1], device=dev, generator=generator) < share.unsqueeze(-1)
    else:
        rank = scores.argsort(-1, descending=True).argsort(-1)  # 0 = the highest score
        n = torch.isfinite(scores).sum(-1)
        keep = rank < torch.ceil(share * n).unsqueeze(-1)
    keep = keep | ~partial.unsqueeze(-1)
    return torch.where(keep.unsqueeze(-1), v, z.to(v.dtype))


# --------------------------------------------------------------------- losses
def diversity_loss(attention: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between the M attention maps (ACMIL's diversity loss).

    Args:
        attention: ``(..., M, n)`` attention probabilities.

    Returns:
        Scalar, averaged over the M(M-1)/2 pairs and the leading axes; 0 when M < 2.
    """
    m = attention.shape[-2]
    if m < 2:
        return attention.new_zeros(())
    unit = F.normalize(attention, dim=-1)
    sim = unit @ unit.transpose(-1, -2)  # (..., M, M)
    iu = torch.triu_indices(m, m, offset=1, device=attention.device)
    return sim[..., iu[0], iu[1]].mean()


def acmil_loss(
    outputs: dict[str, Tensor],
    label: Tensor,
    w_slide: float = 1.0,
    w_branch: float = 1.0,
    w_div: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ACMIL loss of an :class:`AttentionMILClassifier` output.

    ``w_slide * CE(slide) + w_branch * mean_m CE(branch_m) + w_div * diversity(attention)``;
    the branch term is 0 when M = 1 (as in the official code).

    Args:
        outputs: dict with ``slide_logits (..., C)``, ``branch_logits (..., M, C)``,
            ``attention (..., M, N)``.
        label: int class index, shape ``()`` or ``(B,)``.

    Returns:
        ``(total, parts)`` with parts ``slide_ce``, ``branch_ce``, ``diversity`` (detached).
    """
    slide = outputs["slide_logits"]
    branch = outputs["branch_logits"]
    n_classes, m = slide.shape[-1], branch.shape[-2]
    y = label.reshape(-1).long()
    slide_ce = F.cross_entropy(slide.reshape(-1, n_classes), y)
    if m > 1:
        branch_ce = F.cross_entropy(branch.reshape(-1, n_classes), y.repeat_interleave(m))
    else:
        branch_ce = slide_ce.new_zeros(())
    div = diversity_loss(outputs["attention"])
    total = w_slide * slide_ce + w_branch * branch_ce + w_div * div
    parts = {"slide_ce": slide_ce, "branch_ce": branch_ce, "diversity": div}
    return total, {k: v.detach() for k, v in parts.items()}


def hafed_loss(
    outputs: dict[str, Tensor], label: Tensor, cfg: HAFEDConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """HAFED training loss: :func:`acmil_loss` at level 2 plus the level-1 diversity term.

    The level-1 term (cosine similarity between the M1 sub-patch attention maps of each
    patch) is 0 with the paper's M1 = 1.

    Returns:
        ``(total, parts)``; ``parts['diversity']`` is the sum of both levels' terms.
    """
    total, parts = acmil_loss(outputs, label, cfg.w_slide, cfg.w_branch, cfg.w_div)
    if "attention_l1" in outputs and outputs["attention_l1"].shape[-2] > 1:
        div1 = diversity_loss(outputs["attention_l1"])
        total = total + cfg.w_div * div1
        parts["diversity"] = parts["diversity"] + div1.detach()
    return total, parts
