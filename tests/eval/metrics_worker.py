"""One rank of tests/eval/test_metric_classes.py::test_two_processes_equal_one_process.

Run as a script (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment; gloo): each rank
updates every metric with its uneven share of one fixed data set (:func:`data`), the metrics
keyed by ids also with a padding row repeated from its share, as a distributed sampler adds;
rank 0 writes what ``compute`` returns after torchmetrics' reduction. :func:`results` also
runs on one process."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from clipft.eval import CompositionalAccuracy, ImageTextRetrieval, ModalityGap, ZeroShotAccuracy  # noqa: E402

warnings.simplefilter("ignore")
N_CLASSES, N_SAMPLES, N_IMAGES, CAPTIONS = 7, 53, 23, 3


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(N_IMAGES, 16, generator=g), dim=1)
    image_ids = torch.arange(N_IMAGES).repeat_interleave(CAPTIONS)  # 3 captions per image
    text = F.normalize(images[image_ids] + 0.8 * torch.randn(len(image_ids), 16, generator=g), dim=1)
    return {
        "logits": torch.randn(N_SAMPLES, N_CLASSES, generator=g),
        "labels": torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g),
        "image": images[image_ids], "text": text, "image_ids": image_ids, "text_ids": torch.arange(len(image_ids)),
        "positive": text, "negative": F.normalize(torch.randn(len(image_ids), 16, generator=g), dim=1),
    }


def results(rows: slice | None = None, pad: bool = False) -> dict[str, dict[str, float]]:
    """Every metric updated with ``rows`` of :func:`data` (in two updates; with ``pad``, the
    retrieval and gap metrics also get the last pair again), then computed."""
    d = data()
    metrics = {"zeroshot": ZeroShotAccuracy(N_CLASSES, ks=(1, 3)), "retrieval": ImageTextRetrieval(ks=(1, 5)),
               "gap": ModalityGap(seed=0), "compositional": CompositionalAccuracy()}

    def part(name: str, n: int, pad: bool = False) -> torch.Tensor:
        rows_ = torch.arange(n)[rows or slice(None)]
        return d[name][torch.cat([rows_, rows_[-1:]]) if pad else rows_]

    for half in (slice(None, 5), slice(5, None)):
        metrics["zeroshot"].update(part("logits", N_SAMPLES)[half], part("labels", N_SAMPLES)[half])
        pairs = [part(k, N_IMAGES * CAPTIONS, pad)[half] for k in ("image", "text", "image_ids", "text_ids")]
        metrics["retrieval"].update(*pairs)
        metrics["gap"].update(*pairs)
        image, positive, negative = (part(k, N_IMAGES * CAPTIONS)[half] for k in ("image", "positive", "negative"))
        metrics["compositional"].update(image, positive, negative, "swap_att")
    return {name: {k: v.item() for k, v in metric.compute().items()} for name, metric in metrics.items()}


def main(out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    # uneven shares: rank 0 the first 20 rows of each kind, rank 1 the rest
    got = results(slice(0, 20) if rank == 0 else slice(20, None), pad=True)
    if rank == 0:
        torch.save(got, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
