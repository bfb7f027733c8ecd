"""sasha_models — the SASHA model zoo: HAFED, TSU, MIL baselines, their Lightning modules.

Works on tensors and on the small :class:`~sasha_models.data.BagSource` interface; imports
nothing from ``sasha_env``. Names are loaded lazily, so ``import sasha_models.hafed`` (or
using only the models) does not pay for importing Lightning.

Modules: :mod:`.attention` (the one masked-attention helper), :mod:`.hafed`, :mod:`.tsu`,
:mod:`.baselines`, :mod:`.data`, :mod:`.metrics`, :mod:`.lit` (training and checkpoints).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # eager imports for type checkers and IDEs only
    from .attention import GatedAttention, masked_softmax, random_topk_mask  # noqa: F401
    from .baselines import (  # noqa: F401
        ABMIL,
        BASELINES,
        MIL_MODELS,
        MaxMIL,
        MeanMIL,
        TransMIL,
        build_baseline,
    )
    from .data import (  # noqa: F401
        BagDataModule,
        BagDataset,
        BagSource,
        InMemoryBags,
        TSUPairDataModule,
        TSUPairDataset,
        pad_collate,
        pairs_collate,
    )
    from .hafed import (  # noqa: F401
        HAFED,
        AttentionMILClassifier,
        HAFEDConfig,
        acmil_loss,
        diversity_loss,
        hafed_loss,
    )
    from .lit import (  # noqa: F401
        HAFEDModule,
        MILModule,
        TSUModule,
        build_model,
        check_feature_dim,
        load_checkpoint,
        load_model,
        predict_probs,
        slide_logits,
        train_model,
    )
    from .metrics import classification_metrics  # noqa: F401
    from .toy import planted_bags, tsu_problem  # noqa: F401
    from .tsu import TSU, TSUConfig, sample_tsu_pairs, similar_mask  # noqa: F401

_EXPORTS: dict[str, tuple[str, ...]] = {
    "attention": ("GatedAttention", "masked_softmax", "random_topk_mask"),
    "hafed": (
        "HAFED",
        "AttentionMILClassifier",
        "HAFEDConfig",
        "acmil_loss",
        "diversity_loss",
        "hafed_loss",
    ),
    "tsu": ("TSU", "TSUConfig", "sample_tsu_pairs", "similar_mask"),
    "baselines": (
        "ABMIL",
        "BASELINES",
        "MIL_MODELS",
        "MaxMIL",
        "MeanMIL",
        "TransMIL",
        "build_baseline",
    ),
    "data": (
        "BagDataModule",
        "BagDataset",
        "BagSource",
        "InMemoryBags",
        "TSUPairDataModule",
        "TSUPairDataset",
        "pad_collate",
        "pairs_collate",
    ),
    "metrics": ("classification_metrics",),
    "toy": ("planted_bags", "tsu_problem"),
    "lit": (
        "HAFEDModule",
        "MILModule",
        "TSUModule",
        "build_model",
        "check_feature_dim",
        "load_checkpoint",
        "load_model",
        "predict_probs",
        "slide_logits",
        "train_model",
    ),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
