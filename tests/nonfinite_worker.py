"""``clipft`` with the contrastive loss term turned NaN at chosen steps (on one rank or all),
for tests/test_nonfinite.py. Lightning re-runs this script for the other DDP ranks, which
inherit the environment:

    NAN_STEPS=3,7 NAN_RANK=1 python tests/nonfinite_worker.py fit RECIPE key=value ...
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Collection, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipft.methods.base import ContrastiveMethod  # noqa: E402


def poisoned_loss_terms(steps: Collection[int], rank: Optional[int] = None) -> Callable[..., dict[str, Any]]:
    """``ContrastiveMethod.loss_terms`` whose contrastive term is NaN at the given global steps
    (multiplied by NaN, so that its gradients are NaN too), on ``rank`` only if given."""
    original = ContrastiveMethod.loss_terms

    def loss_terms(self: ContrastiveMethod, features: Any, batch: Any) -> dict[str, Any]:
        terms = original(self, features, batch)
        if self.training and self.trainer.global_step in steps and rank in (None, self.global_rank):
            terms = {**terms, "contrastive": terms["contrastive"] * float("nan")}
        return terms

    return loss_terms


if __name__ == "__main__":
    rank = os.environ.get("NAN_RANK")
    steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
    ContrastiveMethod.loss_terms = poisoned_loss_terms(steps, int(rank) if rank else None)  # type: ignore[method-assign]
    from clipft.cli import main

    sys.exit(main(sys.argv[1:]))
