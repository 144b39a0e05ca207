"""One rank of tests/losses/test_contrastive.py::test_two_processes_equal_one_device.

Run as a script by that test (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment); writes the loss, the logit-scale gradient and this rank's feature gradients.
"""

import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from clipft.losses import clip_contrastive_loss  # noqa: E402

warnings.simplefilter("ignore", FutureWarning)  # deprecation notice of torch 2.14


def main(out_file: str) -> None:
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    v_all = torch.randn(8, 4, dtype=torch.float64)
    t_all = torch.randn(8, 4, dtype=torch.float64)
    local = slice(rank * 4, rank * 4 + 4)
    v = v_all[local].clone().requires_grad_(True)
    t = t_all[local].clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    vn, tn = F.normalize(v, dim=1), F.normalize(t, dim=1)
    # the gather the base method uses (Lightning's all_gather(sync_grads=True) wraps this)
    v_gathered = torch.cat(all_gather(vn))
    t_gathered = torch.cat(all_gather(tn))
    loss = clip_contrastive_loss(vn, tn, log_scale.exp(), v_gathered, t_gathered, offset=rank * 4)
    loss.backward()
    scale_grad = log_scale.grad.clone()  # DDP averages replicated parameters' gradients
    dist.all_reduce(scale_grad)
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach().float())
    if rank == 0:
        torch.save({"loss": sum(losses) / world, "scale_grad": scale_grad / world}, out_file)
    torch.save({"v_grad": v.grad, "t_grad": t.grad}, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
