"""clipft.models.checkpoint_io: a checkpoint never runs code it carries. Crafted files (.ckpt,
.pt, DeepSpeed folders) are refused through every entry point (export, validate --ckpt,
run.resume, model.pretrained) unless trusted; real ZeRO checkpoints still read, and clipft's
own consolidation equals DeepSpeed's bit for bit."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from clipft.cli import main
from clipft.config import ModelConfig
from clipft.models import ModelError, build_model, read_state_dict
from clipft.models.checkpoint_io import ALLOWED_GLOBALS, UnsafeCheckpointError, load, trusting
from clipft.models.zero_checkpoint import consolidate

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/quickstart.yaml"
FAST = [
    "data.batch_size=16", "data.synthetic.train_size=64", "data.synthetic.val_size=32", "eval.zeroshot=[]",
    "trainer.enable_progress_bar=false", "run.plot=false", "data.num_workers=0",
]


class Payload:
    """What an attacker pickles: unpickling it runs a shell command (here: creates a marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def _crafted_ckpt(folder: Path, marker: Path) -> Path:
    path = folder / "evil.ckpt"
    torch.save({"state_dict": {"model.logit_scale": torch.zeros(())}, "global_step": 1, "x": Payload(marker)}, path)
    return path


def _crafted_pt(folder: Path, marker: Path) -> Path:
    path = folder / "evil.pt"
    torch.save({"logit_scale": Payload(marker)}, path)
    return path


def _crafted_deepspeed(folder: Path, marker: Path) -> Path:
    """A folder with ``latest`` and a crafted rank-0 model-states file (what run.resume and
    export read first), plus a crafted optimizer-states file (what consolidation reads)."""
    path = folder / "evil_deepspeed"
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save({"module": {}, "buffer_names": [], "x": Payload(marker)}, path / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Payload(marker)}, path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return path


CRAFTED = {"ckpt": _crafted_ckpt, "pt": _crafted_pt, "deepspeed": _crafted_deepspeed}


def _export(src: Path, tmp: Path, *flags: str) -> list[str]:
    return ["export", str(src), "--out", str(tmp / "out"), *flags]


def _validate(src: Path, tmp: Path, *flags: str) -> list[str]:
    return ["validate", RECIPE, *FAST, f"run.out_dir={tmp / 'runs'}", "--ckpt", str(src), *flags]


def _resume(src: Path, tmp: Path, *flags: str) -> list[str]:
    return ["fit", RECIPE, *FAST, f"run.out_dir={tmp / 'runs'}", "trainer.max_steps=1", f"run.resume={src}", *flags]


def _pretrained(src: Path, tmp: Path, *flags: str) -> list[str]:
    return ["fit", RECIPE, *FAST, f"run.out_dir={tmp / 'runs'}", "trainer.max_steps=1", f"model.pretrained={src}", *flags]


ENTRY_POINTS = {"export": _export, "validate": _validate, "resume": _resume, "pretrained": _pretrained}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", CRAFTED)
def test_a_crafted_checkpoint_is_refused_and_never_runs(
    kind: str, entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "payload_ran"
    src = CRAFTED[kind](tmp_path, marker)
    assert main(ENTRY_POINTS[entry](src, tmp_path)) == 2
    stderr = capsys.readouterr().err
    assert not marker.exists()
    errors = [line for line in stderr.splitlines() if line.startswith("clipft: error:")]
    # one line, naming the setting that gave the file (export has none: its argument)
    assert len(errors) == 1 and re.match(r"clipft: error: (--ckpt: |run\.resume: |model\.pretrained: )?checkpoint '", errors[0]), stderr[-2000:]
    assert str(src) in errors[0] and "needs class 'posix.system'" in errors[0] and "--trust-checkpoint" in errors[0]
    assert "weights_only=False" not in errors[0] and "Re-running `torch.load`" not in stderr  # no torch advice


@pytest.mark.parametrize("entry,then", [("export", "not a clipft checkpoint"), ("pretrained", "not hold a state dict")])
def test_trusting_a_crafted_checkpoint_loads_it(
    entry: str, then: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The opt-in (export's flag; fit's flag maps to run.trust_checkpoint=true) really loads
    with weights_only=False: the payload runs, so the test above can fail."""
    marker = tmp_path / "payload_ran"
    src = _crafted_pt(tmp_path, marker)
    assert main(ENTRY_POINTS[entry](src, tmp_path, "--trust-checkpoint")) == 2  # loaded; then not weights
    assert marker.exists()
    assert then in capsys.readouterr().err
    with pytest.raises(UnsafeCheckpointError):  # for that command only
        load(src)


@pytest.mark.parametrize("legacy", [False, True])
def test_the_reader_refuses_any_format_and_names_the_class(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"^checkpoint '.*evil\.pt' needs class 'posix\.system'"):
        load(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="needs class 'posix.system'"):
        load(raw)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x80\x02garbage"])
def test_an_unreadable_file_fails_with_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{path}' is unreadable (truncated or not a checkpoint): ")
    assert "\n" not in message and not message.endswith(": ") and "weights_only" not in message


def test_a_truncated_checkpoint_fails_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelError, match=r"^checkpoint '.*cut\.pt' is unreadable \(truncated or not a checkpoint\): \S"):
        load(path)


def test_a_torchscript_archive_needs_the_opt_in(tmp_path: Path) -> None:
    """Loading TorchScript compiles and runs code from the archive (its __setstate__ methods)."""
    path = tmp_path / "openai_style.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript archive.*--trust-checkpoint"):
        read_state_dict(path)
    with trusting(True):
        assert set(read_state_dict(path)) == {"weight", "bias"}


def test_a_plain_folder_as_pretrained_says_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_pretrained(tmp_path, tmp_path)) == 2
    assert "is a folder but not a DeepSpeed checkpoint (no 'latest' file)" in capsys.readouterr().err


def test_latest_must_name_a_folder_inside_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "latest").write_text("../outside")
    with pytest.raises(ModelError, match="'latest' names '../outside', which is not a folder inside it"):
        read_state_dict(tmp_path / "ds")


def test_deepspeed_reads_a_resume_through_the_safe_reader(tmp_path: Path) -> None:
    """Both DeepSpeed strategies wrap the engine's checkpoint engine: saving is DeepSpeed's,
    loading is checkpoint_io's (the slow test below resumes a real run through it)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from clipft.config import load_config
    from clipft.strategies import SafeCheckpointEngine, SafeDeepSpeedStrategy, build_strategy

    engine = SafeCheckpointEngine(TorchCheckpointEngine())
    engine.save({"w": torch.ones(2)}, str(tmp_path / "ok.pt"))
    assert torch.equal(engine.load(str(tmp_path / "ok.pt"))["w"], torch.ones(2))
    marker = tmp_path / "payload_ran"
    with pytest.raises(UnsafeCheckpointError, match="evil.pt' needs class 'posix.system'"):
        engine.load(str(_crafted_pt(tmp_path, marker)))
    assert not marker.exists()
    for accelerator in ("cpu", "gpu"):
        cfg = load_config(None, ["include=configs/trainer/deepspeed_zero3.yaml", f"trainer.accelerator={accelerator}"])
        assert isinstance(build_strategy(cfg.trainer), SafeDeepSpeedStrategy)


# ------------------------------------------------------------------ real DeepSpeed checkpoints

_DS = ["trainer.accelerator=cpu", "trainer.precision=fp32", "trainer.max_steps=2", "trainer.val_check_interval=2"]


def _deepspeed_fit(out: Path, config: str, *extra: str) -> Path:
    command = [sys.executable, "-m", "clipft", "fit", RECIPE, f"include=configs/trainer/{config}.yaml", *FAST, *_DS,
               "trainer.devices=1", f"run.out_dir={out}", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(out.glob("quickstart/*/checkpoints/last.ckpt"))


@pytest.fixture(scope="module", params=["deepspeed_zero3", pytest.param("deepspeed_zero2", marks=pytest.mark.slow)])
def zero_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-process CPU run's checkpoint folder under a shipped ZeRO config CPUs can run (the
    *_offload ones need DeepSpeedCPUAdam, a compiled op); ZeRO-2 is the slow one (18 s each)."""
    return _deepspeed_fit(tmp_path_factory.mktemp(request.param), request.param)


def _deepspeed_consolidation(folder: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder))


def _assert_identical(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert list(mine) == list(theirs)
    for name, value in theirs.items():
        assert mine[name].dtype == value.dtype and torch.equal(mine[name], value), name


def test_consolidation_equals_deepspeeds_bit_for_bit(zero_folder: Path, tmp_path: Path) -> None:
    """...and the folder exports, and starts a model as model.pretrained."""
    _assert_identical(consolidate(zero_folder), _deepspeed_consolidation(zero_folder))
    assert main(["export", str(zero_folder), "--out", str(tmp_path / "out")]) == 0
    model = build_model(ModelConfig(pretrained=str(zero_folder))).model
    assert torch.equal(model.state_dict()["visual.proj"], consolidate(zero_folder)["model.visual.proj"])


def _needed_globals(files: list[Path]) -> set[str]:
    """Re-measures ALLOWED_GLOBALS: what the files name beyond torch's weights-only defaults."""
    for f in files:
        load(f)  # and each one loads
    return {name for f in files for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(f))}


def test_the_allowlist_covers_what_a_zero_run_writes(zero_folder: Path) -> None:
    files = sorted(zero_folder.glob("*/*.pt"))
    needed = _needed_globals(files)
    assert len(files) == 2 and needed <= set(ALLOWED_GLOBALS), sorted(needed - set(ALLOWED_GLOBALS))
    assert {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler"} <= needed


def test_the_allowlist_covers_what_a_plain_run_writes(tmp_path: Path) -> None:
    """A run's .ckpt files (with an EMA) and clipft's hard-image cache need no class at all."""
    assert main(["fit", RECIPE, *FAST, f"run.out_dir={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "method.ema_momentum=0.9", "data.hard_images=1"]) == 0
    files = [*tmp_path.glob("quickstart/*/checkpoints/*.ckpt"), *tmp_path.glob(".cache/**/*.pt")]
    assert len(files) == 3 and _needed_globals(files) == set()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_two_process_consolidation_equals_deepspeeds(config: str, tmp_path: Path) -> None:
    folder = _deepspeed_fit(tmp_path, config, "trainer.devices=2")
    _assert_identical(consolidate(folder), _deepspeed_consolidation(folder))
    assert _needed_globals(sorted(folder.glob("*/*.pt"))) <= set(ALLOWED_GLOBALS)


@pytest.mark.slow
def test_a_zero2_run_resumes_and_a_crafted_optimizer_state_is_refused_on_resume(tmp_path: Path) -> None:
    """DeepSpeed reads every rank's file on resume through clipft.strategies.SafeCheckpointEngine."""
    last = _deepspeed_fit(tmp_path / "run", "deepspeed_zero2")
    _deepspeed_fit(tmp_path / "run", "deepspeed_zero2", "trainer.max_steps=4", "run.resume=last")
    marker = tmp_path / "payload_ran"
    optim = next(last.glob("*/*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(marker)}, optim)
    command = [sys.executable, "-m", "clipft", "fit", RECIPE, "include=configs/trainer/deepspeed_zero2.yaml", *FAST,
               *_DS, "trainer.devices=1", f"run.out_dir={tmp_path / 'run'}", "trainer.max_steps=6", "run.resume=last"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2 and not marker.exists()
    assert f"clipft: error: checkpoint '{optim}' needs class 'posix.system'" in result.stderr
