"""The fault matrix: an input (recipe, checkpoint, folder) with a fault, through the command a
user runs, gives exit code 2 and exactly one line saying what is wrong and what to do, with no
traceback, and leaves no run folder behind. Each case lists the message it must print."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import pytest
import torch

from clipft.cli import main
from conftest import FAST_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
SHORT = ["trainer.max_steps=2", "eval.compositional.source=null", "eval.zeroshot=[]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real clipft run's last checkpoint (2 steps), shared by the cases."""
    out = tmp_path_factory.mktemp("source")
    assert main(["fit", QUICKSTART, *FAST_OVERRIDES, *SHORT, f"run.out_dir={out}"]) == 0
    return next(out.glob("quickstart/*/checkpoints/last.ckpt"))


def _nan_checkpoint(checkpoint: Path, tmp: Path) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    for value in state["state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(state, tmp / "nan.ckpt")
    return tmp / "nan.ckpt"


def _truncated(checkpoint: Path, tmp: Path) -> Path:
    data = checkpoint.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.ckpt"


def _empty(checkpoint: Path, tmp: Path) -> Path:
    (tmp / "empty.ckpt").touch()
    return tmp / "empty.ckpt"


def _plain_folder(checkpoint: Path, tmp: Path) -> Path:
    (tmp / "weights").mkdir()
    (tmp / "weights" / "notes.txt").write_text("not a checkpoint")
    return tmp / "weights"


def _outside_file(checkpoint: Path, tmp: Path) -> Path:
    (tmp / "a-file").write_text("")
    return tmp / "a-file" / "runs"


class _Payload:
    """A crafted pickle: loading it would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch '{self.marker}'",)


def _crafted(checkpoint: Path, tmp: Path) -> Path:
    torch.save({"state_dict": {"model.logit_scale": torch.zeros(())}, "x": _Payload(tmp / "payload_ran")}, tmp / "crafted.ckpt")
    return tmp / "crafted.ckpt"


UNSAFE = ("checkpoint 'INPUT' needs class 'posix.system', which clipft does not load from a file it did not write; "
          "if you trust this file, pass --trust-checkpoint (run.trust_checkpoint=true)")
UNREADABLE = "checkpoint 'INPUT' is unreadable (truncated or not a checkpoint): "
NOT_DEEPSPEED = "'INPUT' is a folder but not a DeepSpeed checkpoint (no 'latest' file); pass a checkpoint file or a DeepSpeed checkpoint folder"

# (case id, how to make the faulty input, the command (INPUT and OUT are filled in), the message)
CASES: list[tuple[str, Callable[[Path, Path], Path], list[str], str]] = [
    ("validate --ckpt crafted pickle", _crafted, ["validate", QUICKSTART, "--ckpt", "INPUT"], "--ckpt: " + UNSAFE),
    ("fit run.resume crafted pickle", _crafted, ["fit", QUICKSTART, "run.resume=INPUT"], "run.resume: " + UNSAFE),
    ("fit model.pretrained crafted pickle", _crafted, ["fit", QUICKSTART, "model.pretrained=INPUT"], "model.pretrained: " + UNSAFE),
    ("export crafted pickle", _crafted, ["export", "INPUT", "--out", "OUT"], UNSAFE),
    ("validate --ckpt truncated", _truncated, ["validate", QUICKSTART, "--ckpt", "INPUT"],
     "--ckpt: " + UNREADABLE + "PytorchStreamReader failed reading zip archive: failed finding central directory"),
    ("fit run.resume truncated", _truncated, ["fit", QUICKSTART, "run.resume=INPUT"],
     "run.resume: " + UNREADABLE + "PytorchStreamReader failed reading zip archive: failed finding central directory"),
    ("fit run.resume empty file", _empty, ["fit", QUICKSTART, "run.resume=INPUT"], "run.resume: " + UNREADABLE + "EOFError"),
    ("validate --ckpt empty file", _empty, ["validate", QUICKSTART, "--ckpt", "INPUT"], "--ckpt: " + UNREADABLE + "EOFError"),
    ("validate --ckpt a plain folder", _plain_folder, ["validate", QUICKSTART, "--ckpt", "INPUT"], "--ckpt: " + NOT_DEEPSPEED),
    ("fit model.pretrained a plain folder", _plain_folder, ["fit", QUICKSTART, "model.pretrained=INPUT"],
     "model.pretrained: " + NOT_DEEPSPEED),
    ("validate --ckpt NaN weights", _nan_checkpoint, ["validate", QUICKSTART, "--ckpt", "INPUT"],
     "--ckpt: 'INPUT' holds NaN or inf in 62 weight tensors (first: ln_final.bias); the run that wrote it diverged: "
     "use an earlier checkpoint"),
    ("fit model.pretrained NaN weights", _nan_checkpoint, ["fit", QUICKSTART, "model.pretrained=INPUT"],
     "model.pretrained: 'INPUT' holds NaN or inf in 62 weight tensors (first: ln_final.bias); the run that wrote it "
     "diverged: use an earlier checkpoint"),
    ("fit run.resume a plain folder", _plain_folder, ["fit", QUICKSTART, "run.resume=INPUT"],
     "run.resume: 'INPUT' is a folder but neither a run folder (with checkpoints/) nor a DeepSpeed checkpoint "
     "(with a 'latest' file)"),
    ("fit run.out_dir under a file", _outside_file, ["fit", QUICKSTART, "run.out_dir=INPUT"],
     "run.out_dir: cannot create the run folder under 'INPUT' (Not a directory); set run.out_dir to a "
     "folder you can write to"),
    ("export --out a file", _empty, ["export", "CHECKPOINT", "--out", "INPUT"],
     "--out INPUT: a file of that name exists; choose a folder name"),
    ("fit diverging (optim.lr=1e4)", lambda checkpoint, tmp: tmp, ["fit", QUICKSTART, "optim.lr=1e4"],
     "training diverged at step 1: gradient norm is not finite; no checkpoint yet: start again after you lower "
     "optim.lr (now 10000) or set trainer.gradient_clip_val (e.g. 1.0)"),
]


@pytest.mark.parametrize("name, make, command, message", CASES, ids=[c[0] for c in CASES])
def test_fault_gives_one_clear_line(
    name: str, make: Callable[[Path, Path], Path], command: list[str], message: str, checkpoint: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    faulty = make(checkpoint, tmp_path)
    out = tmp_path / "runs"
    fill = {"INPUT": str(faulty), "CHECKPOINT": str(checkpoint), "OUT": str(tmp_path / "exported")}
    argv = [fill.get(a, a.replace("INPUT", str(faulty))) for a in command]
    if argv[0] in ("fit", "validate"):
        argv += [*FAST_OVERRIDES, *SHORT]
        if not any(a.startswith("run.out_dir=") for a in argv[2:]):
            argv.append(f"run.out_dir={out}")
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipft: error: ")]
    assert err == ["clipft: error: " + message.replace("INPUT", str(faulty))]
    assert not list(out.glob("*/*")), "a failed run left a run folder"
    assert not (tmp_path / "payload_ran").exists(), "code in the file ran"
    assert not (tmp_path / "exported").exists()


def test_an_empty_recipe_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main(["fit", str(tmp_path / "empty.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"clipft: error: {tmp_path / 'empty.yaml'}: the recipe is empty (no keys), so it would train the defaults; "
        "copy a recipe from recipes/ (recipes/quickstart.yaml is the smallest) and edit it"
    )


def test_nan_features_at_validation_stop_every_rank_with_one_line(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipft.methods.base import ContrastiveMethod
    encode_image = ContrastiveMethod.encode_image
    monkeypatch.setattr(ContrastiveMethod, "encode_image",
                        lambda self, images, normalize=True: encode_image(self, images, normalize) * float("nan"))
    assert main(["validate", QUICKSTART, *FAST_OVERRIDES, *SHORT, f"run.out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "clipft: error: validation at step 0: 96 of 96 image features are NaN or inf, so the model's weights are: "
        "evaluate an earlier checkpoint, or train again with a lower optim.lr / trainer.gradient_clip_val"
    )
    assert not list(tmp_path.glob("quickstart/*"))


def test_a_failed_new_run_leaves_no_folder_but_keeps_one_with_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from clipft.methods.base import ContrastiveMethod
    def failing_step(self: ContrastiveMethod, batch: object, batch_idx: int) -> torch.Tensor:
        if self.global_step == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(self, batch, batch_idx)

    original = ContrastiveMethod.training_step
    monkeypatch.setattr(ContrastiveMethod, "training_step", failing_step)
    argv = ["fit", QUICKSTART, *FAST_OVERRIDES, "trainer.max_steps=10", "trainer.log_every_n_steps=1"]
    # nothing logged yet (rows every 50 steps): nothing is left
    with pytest.raises(RuntimeError):
        main([*argv, f"run.out_dir={tmp_path / 'a'}", "trainer.log_every_n_steps=50"])
    assert not list((tmp_path / "a").glob("quickstart/*"))
    # metrics were logged: the folder stays for debugging, and the log says where
    with pytest.raises(RuntimeError):
        main([*argv, f"run.out_dir={tmp_path / 'b'}"])
    kept = list((tmp_path / "b").glob("quickstart/*"))
    assert len(kept) == 1 and (kept[0] / "metrics.csv").is_file() and not list((kept[0] / "checkpoints").glob("*"))
    assert f"its config and metrics are kept in {kept[0]}" in caplog.text


def test_resuming_a_checkpoint_from_elsewhere_writes_only_a_new_run_folder(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    mine = tmp_path / "downloads"
    mine.mkdir()
    (mine / "model.ckpt").write_bytes(checkpoint.read_bytes())
    before = {p: p.stat().st_mtime_ns for p in mine.iterdir()}
    out = tmp_path / "runs"
    assert main(["fit", QUICKSTART, *FAST_OVERRIDES, *SHORT, "trainer.max_steps=4", f"run.out_dir={out}",
                 f"run.resume={mine / 'model.ckpt'}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in mine.iterdir()} == before  # the user's folder is untouched
    (run,) = out.glob("quickstart/*")
    report = json.loads((run / "report.json").read_text())
    assert report["resumed_from"] == str(mine / "model.ckpt") and report["steps"] == 4
    assert report["last_checkpoint"] == "checkpoints/last.ckpt" and (run / "checkpoints" / "last.ckpt").is_file()


def test_export_never_merges_into_a_users_folder_and_never_leaves_half_an_export(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import safetensors.torch

    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"clipft: error: --out {out}: the folder is not empty; choose a new folder, or pass --force to replace it"
    )
    assert [p.name for p in out.iterdir()] == ["README.md"]

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):
        main(["export", str(checkpoint), "--out", str(out), "--force"])
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no half-written sibling
    assert (out / "README.md").read_text() == "my notes"  # the old folder as it was
    monkeypatch.undo()

    umask = os.umask(0o022)
    try:
        assert main(["export", str(checkpoint), "--out", str(out), "--force"]) == 0
    finally:
        os.umask(umask)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    assert "my notes" not in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes == {"export": 0o755, "README.md": 0o644, "open_clip_config.json": 0o644,
                     "open_clip_model.safetensors": 0o644}


def test_a_read_only_out_dir_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Root ignores a folder's write bits (CI runs as root), so the refusal is simulated."""
    out = tmp_path / "read-only"
    mkdir = Path.mkdir

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        if str(self).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(self))
        mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["fit", QUICKSTART, *FAST_OVERRIDES, *SHORT, f"run.out_dir={out}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"clipft: error: run.out_dir: cannot create the run folder under '{out}' (Permission denied); "
        "set run.out_dir to a folder you can write to"
    )
