"""A DeepSpeed ZeRO checkpoint folder read through :mod:`clipft.models.checkpoint_io`.

DeepSpeed's own converter (``deepspeed.utils.zero_to_fp32``) unpickles every rank's file with
``weights_only=False``, so a crafted folder would run code; this is the same consolidation
written against the safe loader. The layout (DeepSpeed 0.16-0.19): ``latest`` names the tag
folder; its ``*_model_states.pt`` hold the buffers (``module``), the trainable parameters'
names and shapes per optimizer group (``param_shapes``), the frozen parameters
(``frozen_param_shapes`` / ``frozen_param_fragments``) and tied names (``shared_params``);
each rank's ``*_optim_states.pt`` holds its slice of the fp32 master weights. ZeRO-1/2: the
group's flat vector is cut into equal consecutive slices, one per rank, so the ranks' slices
end to end are the group, parameters one after the other (with optional alignment padding
between them). ZeRO-3: every parameter is cut into ``ceil(n / world)`` elements per rank, and
each rank keeps its pieces end to end across its groups.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Union

import torch

from clipft.models.checkpoint_io import load
from clipft.models.errors import ModelError

PathLike = Union[str, Path]


def tag_folder(path: PathLike) -> Path:
    """The folder that ``latest`` names (Lightning writes ``checkpoint``), checked to lie inside."""
    path = Path(path)
    latest = path / "latest"
    if not latest.is_file():
        raise ModelError(f"'{path}' is a folder but not a DeepSpeed checkpoint (no 'latest' file); "
                         "pass a checkpoint file or a DeepSpeed checkpoint folder")
    tag = latest.read_text().strip()
    if not tag or Path(tag).name != tag or not (path / tag).is_dir():
        raise ModelError(f"DeepSpeed checkpoint '{path}': 'latest' names '{tag[:80]}', which is not a folder inside it")
    return path / tag


def _rank_files(folder: Path, pattern: str) -> list[Path]:
    """Files in rank order (natural: rank 2 before rank 10)."""
    files = sorted(folder.glob(pattern), key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)])
    if not files:
        raise ModelError(f"DeepSpeed checkpoint '{folder}' has no {pattern} files (an incomplete save?)")
    return files


def model_states_file(path: PathLike) -> Path:
    """Rank 0's model-states file (ZeRO-1/2: ``mp_rank_00_model_states.pt``, ZeRO-3:
    ``zero_pp_rank_0_mp_rank_00_model_states.pt``): Lightning's state rides in it."""
    return _rank_files(tag_folder(path), "*mp_rank_00_model_states.pt")[0]


def consolidate(path: PathLike) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO-1/2/3 checkpoint folder, gathered from every rank's shard:
    the same tensors as DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``."""
    folder = tag_folder(path)
    models = [load(f) for f in _rank_files(folder, "*_model_states.pt")]
    optims = [load(f, mmap=True)["optimizer_state_dict"] for f in _rank_files(folder, "*_optim_states.pt")]
    try:
        return _consolidate(folder, models, optims)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
        raise ModelError(f"DeepSpeed checkpoint '{folder}' does not hold a ZeRO layout clipft reads "
                         f"({type(err).__name__}: {str(err)[:120]})") from None


def _consolidate(folder: Path, models: list[dict[str, Any]], optims: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    stage = int(optims[0]["zero_stage"])
    world = optims[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optims):
        raise ModelError(f"DeepSpeed checkpoint '{folder}' was written by {world} ranks but holds {len(optims)} "
                         "optimizer-state files (an overwritten or incomplete save?)")
    first = models[0]
    state = {k: v.float() for k, v in first["module"].items() if k in first["buffer_names"]}
    frozen = first.get("frozen_param_shapes") or {}
    if stage <= 2:
        state.update({name: first["frozen_param_fragments"][name] for name in frozen})
        flat = [o["single_partition_of_fp32_groups"] for o in optims]
        state.update(_zero2_parameters(first["param_shapes"], flat, optims[0].get("param_alignment_paddings")))
    elif stage == 3:
        state.update({name: _gather([m["frozen_param_fragments"][name] for m in models], shape)
                      for name, shape in frozen.items()})
        state.update(_zero3_parameters(first["param_shapes"], [o["fp32_flat_groups"] for o in optims]))
    else:
        raise ValueError(f"unknown ZeRO stage {stage}")
    for alias, source in first["shared_params"].items():
        if source in state:
            state[alias] = state[source]
    return state


def _numel(shape: Any) -> int:
    return math.prod(shape)


def _gather(pieces: list[torch.Tensor], shape: Any) -> torch.Tensor:
    """The pieces end to end, cut to the parameter's size (ZeRO-3 pads the last rank's)."""
    return torch.cat(pieces).narrow(0, 0, _numel(shape)).view(shape)


def _zero2_parameters(shapes: list[dict[str, Any]], flat: list[list[torch.Tensor]],
                      paddings: list[list[int]] | None) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: per group, the ranks' slices end to end, then the parameters in order."""
    state = {}
    for group, group_shapes in enumerate(shapes):
        vector = torch.cat([rank[group] for rank in flat])
        pads = paddings[group] if paddings is not None else [0] * len(group_shapes)
        if len(pads) != len(group_shapes):
            raise ValueError(f"group {group}: {len(pads)} alignment paddings for {len(group_shapes)} parameters")
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), pads):
            state[name] = vector.narrow(0, offset, _numel(shape)).view(shape)
            offset += _numel(shape) + pad
        if offset > vector.numel():
            raise ValueError(f"group {group} needs {offset} elements but the ranks hold {vector.numel()}")
    return state


def _zero3_parameters(shapes: list[dict[str, Any]], flat: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ZeRO-3: each parameter's piece from every rank, at the same offset in each rank's
    groups laid end to end."""
    ranks = [torch.cat(groups) for groups in flat]
    state, offset = {}, 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        piece = math.ceil(_numel(shape) / len(ranks))
        state[name] = _gather([rank.narrow(0, offset, piece) for rank in ranks], shape)
        offset += piece
    if offset != ranks[0].numel():
        raise ValueError(f"the parameters take {offset} elements per rank but each rank holds {ranks[0].numel()}")
    return state


def saved_world_size(path: PathLike) -> int:
    """The number of data-parallel ranks that wrote a ZeRO checkpoint folder."""
    return len(_rank_files(tag_folder(path), "*_optim_states.pt"))


def _base_optimizer_state(optim: dict[str, Any]) -> dict[str, Any]:
    # ZeRO-1/2: base_optimizer_state; ZeRO-3: optimizer_state_dict (the wrapped torch optimizer's)
    return optim["base_optimizer_state"] if "base_optimizer_state" in optim else optim["optimizer_state_dict"]


def consolidate_optimizer(path: PathLike, keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """The Adam moments of a ZeRO-1/2/3 checkpoint folder, gathered from every rank's shard into
    full tensors by parameter name (``{key: {name: tensor}}``), and the optimizer's step count.
    The moments are laid out exactly as the fp32 master weights (:func:`consolidate`), so the
    same gathering applies; read through the safe loader."""
    folder = tag_folder(path)
    first = load(_rank_files(folder, "*_model_states.pt")[0])
    optims = [load(f, mmap=True)["optimizer_state_dict"] for f in _rank_files(folder, "*_optim_states.pt")]
    try:
        stage = int(optims[0]["zero_stage"])
        states = [_base_optimizer_state(o)["state"] for o in optims]
        groups = len(first["param_shapes"]) if stage <= 2 else len(optims[0]["fp32_flat_groups"])
        moments = {}
        for key in keys:
            flat = [[state[g][key] for g in range(groups)] for state in states]
            moments[key] = (_zero2_parameters(first["param_shapes"], flat, optims[0].get("param_alignment_paddings"))
                            if stage <= 2 else _zero3_parameters(first["param_shapes"], flat))
        step = max(int(state[g]["step"]) for state in states for g in range(groups) if "step" in state[g])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
        raise ModelError(f"DeepSpeed checkpoint '{folder}': could not gather its optimizer state "
                         f"({type(err).__name__}: {str(err)[:120]})") from None
    return moments, step
