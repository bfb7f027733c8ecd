"""Small synthetic problems for tests, examples and sanity checks (seconds on a CPU).

- :func:`planted_bags` — bags of patches × sub-patches where a positive slide hides one
  shifted sub-patch in one patch: the problem HAFED is built for.
- :func:`tsu_problem` — slides of clustered low-res features with distilled features that are
  a fixed nonlinear function of ``z`` plus a slide-specific offset, so knowing ``v_a``
  helps predict ``v_j``.
"""

from __future__ import annotations

import numpy as np

from .data import InMemoryBags

__all__ = ["planted_bags", "tsu_problem"]


def _splits(n: int, fractions: tuple[float, float, float]) -> list[str]:
    """Split names for ``n`` slides listed with labels cycling through the classes."""
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)


def planted_bags(
    n_slides: int = 60,
    d: int = 16,
    k: int = 4,
    n_patches: tuple[int, int] = (20, 40),
    n_classes: int = 2,
    shift: float = 8.0,
    n_planted: int = 1,
    fractions: tuple[float, float, float] = (0.5, 0.2, 0.3),
    seed: int = 0,
) -> tuple[InMemoryBags, dict[str, int]]:
    """Bags with one planted sub-patch per non-zero class.

    Slide i has label ``i % n_classes`` and ``N ~ U[n_patches]`` patches of ``k`` sub-patches
    with ``N(0, I_d)`` features. A slide of class ``c > 0`` has one random sub-patch of one
    random patch shifted by ``shift`` along a class direction (a random ±1/√d vector);
    ``n_planted > 1`` plants that many patches (one sub-patch each). Low-res features are the sub-patch
    mean plus noise. Splits follow the slide order (so every split holds every class).

    Returns:
        ``(source, planted)`` with ``lowres`` and ``highres`` features, and
        ``planted[slide_id]`` = the (first) planted patch index (-1 for class 0).
    """
    rng = np.random.default_rng(seed)
    # class c > 0 shifts along its own unit direction: +-1/sqrt(d) on every axis
    directions = rng.choice([-1.0, 1.0], size=(max(1, n_classes - 1), d)) / np.sqrt(d)
    directions[0] = np.abs(directions[0])
    labels, lowres, highres, planted = {}, {}, {}, {}
    split_names = _splits(n_slides, fractions)
    splits = {}
    for i in range(n_slides):
        sid = f"slide{i:03d}"
        y = i % n_classes
        n = int(rng.integers(n_patches[0], n_patches[1] + 1))
        hi = rng.normal(size=(n, k, d)).astype(np.float32)
        where = -1
        if y > 0:
            patches = rng.choice(n, size=min(n_planted, n), replace=False)
            for p in patches:
                hi[p, rng.integers(k)] += shift * directions[y - 1]
            where = int(patches[0])
        labels[sid], highres[sid], planted[sid], splits[sid] = y, hi, where, split_names[i]
        lowres[sid] = (hi.mean(1) + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    source = InMemoryBags(
        labels,
        lowres=lowres,
        highres=highres,
        splits=splits,
        class_names=["negative"] + [f"class{c}" for c in range(1, n_classes)],
    )
    return source, planted


def tsu_problem(
    n_slides: int = 40,
    d: int = 16,
    n_patches: int = 60,
    n_clusters: int = 4,
    noise: float = 0.05,
    fractions: tuple[float, float, float] = (0.5, 0.2, 0.3),
    seed: int = 0,
) -> InMemoryBags:
    """Slides whose distilled features depend on ``z`` nonlinearly and on the slide.

    ``z`` rows are noisy copies of a few cluster centres (so within-cluster cosines exceed
    0.95); ``v = standardise(tanh(z W1) W2 + s)`` with fixed random ``W1, W2`` shared by all
    slides and an offset ``s`` drawn per slide (the structure the anchor's ``v_a`` reveals).
    Rows of ``v`` are standardised like the TSU's LayerNorm output.

    Returns:
        An :class:`InMemoryBags` with ``lowres`` and ``distilled`` features, labels 0.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(d, 2 * d)) / np.sqrt(d)
    w2 = rng.normal(size=(2 * d, d)) / np.sqrt(2 * d)
    split_names = _splits(n_slides, fractions)
    labels, lowres, distilled, splits = {}, {}, {}, {}
    for i in range(n_slides):
        sid = f"slide{i:03d}"
        centres = rng.normal(size=(n_clusters, d))
        z = centres[rng.integers(n_clusters, size=n_patches)]
        z = z + noise * rng.normal(size=z.shape)
        v = np.tanh(z @ w1) @ w2 + rng.normal(size=d)
        v = (v - v.mean(1, keepdims=True)) / v.std(1, keepdims=True)
        labels[sid], splits[sid] = 0, split_names[i]
        lowres[sid], distilled[sid] = z.astype(np.float32), v.astype(np.float32)
    return InMemoryBags(labels, lowres=lowres, distilled=distilled, splits=splits)
