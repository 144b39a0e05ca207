"""Evaluation: metric functions (``metrics``, ``gap``, ``compositional``), Lightning callbacks
(``callbacks``), and clipft's evaluation quantities as torchmetrics ``Metric`` classes, for any
LightningModule (exported here).

Each class accumulates with ``update`` and returns a dict of named values from ``compute``;
torchmetrics reduces its states across processes (sums for counts, concatenation for
features), so ``compute`` on every rank gives the number of the whole evaluation set. clipft's
own callbacks (:mod:`clipft.eval.callbacks`) compute through these classes.

* :class:`ZeroShotAccuracy` — top-K accuracy (micro) and balanced accuracy (mean per-class
  recall over the classes that occur) of ``[N, C]`` scores;
* :class:`ImageTextRetrieval` — image→text and text→image R@K with several captions per image
  (COCO's "a relevant item in the top K"; :func:`clipft.eval.metrics.retrieval_recall`);
* :class:`ModalityGap` — centroid distance, linear separability, alignment, uniformity and
  the rest of :func:`clipft.eval.gap.modality_gap_metrics`;
* :class:`CompositionalAccuracy` — SugarCrepe's accuracy (caption vs negative caption) per
  subset and per REPLACE / SWAP / ADD group.

How they relate to torchmetrics' built-ins, and where the conventions differ, is in
docs/evaluation.md#as-torchmetrics-metrics. Each class lives beside the functions of its
quantity.
"""

from clipft.eval.compositional import CompositionalAccuracy
from clipft.eval.gap import ModalityGap
from clipft.eval.metrics import ImageTextRetrieval, ZeroShotAccuracy

__all__ = ["CompositionalAccuracy", "ImageTextRetrieval", "ModalityGap", "ZeroShotAccuracy"]
