"""Every read of a checkpoint file: ``torch.load(weights_only=True)`` with a short allowlist.

A checkpoint is a pickle, and unpickling can call any function the file names, so a crafted
file (a DeepSpeed folder, a .ckpt, a .pt handed over for ``clipft export``, ``validate
--ckpt``, ``run.resume`` or ``model.pretrained``) could run a shell command. Here a file is
read by torch's weights-only unpickler, which builds tensors, containers and primitives
only, plus the few classes in :data:`ALLOWED_GLOBALS` that clipft's own checkpoints hold.
Anything else is refused with :class:`UnsafeCheckpointError`, naming the file and the class;
nothing falls back to an unsafe load by itself. ``run.trust_checkpoint=true`` (``clipft
export|validate --trust-checkpoint``) lets a refused file load with ``weights_only=False``,
after a warning that names it. TorchScript archives (OpenAI's released .pt files) need the
same opt-in: ``torch.jit.load`` compiles the code in the archive and runs the ``__setstate__``
methods it defines, so it is not safe for a file of unknown origin (torch's serialization notes).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import pickletools
import re
import zipfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import torch

from clipft.models.errors import ModelError

log = logging.getLogger(__name__)

# The classes beyond torch's weights-only defaults that clipft's checkpoints hold, measured
# with torch.serialization.get_unsafe_globals_in_checkpoint on the files every shipped trainer
# config writes (tests/models/test_checkpoint_io.py re-measures them; docs/safety.md):
# DeepSpeed's ZeRO-1/2 and ZeRO-3 ``*_optim_states.pt``. Model-states files, Lightning .ckpt
# files and clipft's caches need none.
ALLOWED_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

_TORCH_OWN = ("torch.", "collections.OrderedDict")  # what torch's own legacy files name
TRUST_HINT = "if you trust this file, pass --trust-checkpoint (run.trust_checkpoint=true)"
_TRUSTED: ContextVar[bool] = ContextVar("clipft_trust_checkpoint", default=False)
PathLike = Union[str, Path]


class UnsafeCheckpointError(ModelError):
    """A checkpoint that needs a class clipft does not load from a file it did not write."""


@contextlib.contextmanager
def trusting(enabled: bool) -> Iterator[None]:
    """Within the block, may a refused file load with ``weights_only=False``? Set by the
    runner's verbs from ``run.trust_checkpoint`` and by ``clipft export --trust-checkpoint``."""
    token = _TRUSTED.set(enabled)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def load(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The object ``torch.save`` wrote to ``path``, read without running code from the file.

    Raises :class:`UnsafeCheckpointError` for a file that needs anything beyond tensors and
    :data:`ALLOWED_GLOBALS` (unless trusted), and :class:`ModelError` for a missing,
    truncated or foreign file; each one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' not found (or not a file)")
    if _is_torchscript(path):
        return _load_torchscript(path, map_location)
    try:
        named = _named_globals(path)
        refused = sorted(named - set(ALLOWED_GLOBALS)) if named is not None else []
        if not refused:
            with torch.serialization.safe_globals(_import(ALLOWED_GLOBALS if named is None else named)):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and named is not None)
    except pickle.UnpicklingError as err:
        name = _refused_name(err) if "weights only load failed" in str(err).lower() else None
        name = name or _legacy_global(path)
        if name is None:
            raise _unreadable(path, err) from None
        refused = [name]
    except Exception as err:  # truncated, empty, not a torch file: one line, no traceback
        raise _unreadable(path, err) from None
    return _load_trusted(path, refused[0], map_location, mmap)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with ``<name>/constants.pkl`` and compiled code."""
    if not zipfile.is_zipfile(path):
        return False
    with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())
    return False


def _named_globals(path: Path) -> set[str] | None:
    """The classes and functions a zip checkpoint names beyond torch's weights-only defaults,
    read from its pickle without running it. None for a legacy (non-zip) file, which cannot be
    scanned: there the weights-only unpickler refuses what it meets (:func:`_refused_name`)."""
    if not zipfile.is_zipfile(path):
        return None
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def _import(names: Iterable[str]) -> list[Any]:
    """The allowlisted ones of ``names`` as objects, imported only when a file needs them
    (DeepSpeed's import takes seconds); one not installed cannot be in the file either."""
    objects = []
    for name in sorted(set(names) & set(ALLOWED_GLOBALS)):
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            objects.append(getattr(importlib.import_module(module), attr))
    return objects


def _refused_name(err: Exception) -> str | None:
    """The class torch's weights-only unpickler refused, from its message."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    return found.group(1) if found else None


def _legacy_global(path: Path) -> str | None:
    """The first class or function a legacy (non-zip) file names beyond the allowlist, found
    by reading its pickles' opcodes without running them (torch's unpickler reports only
    "Unsupported operand" for a protocol-4 GLOBAL). None: the file names none."""
    strings: list[str] = []
    with contextlib.suppress(Exception), open(path, "rb") as f:
        while True:  # a legacy file is several pickles in a row, then raw storage bytes
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    strings.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    strings.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                    continue
                else:
                    continue
                if strings[-1] not in ALLOWED_GLOBALS and not strings[-1].startswith(_TORCH_OWN):
                    return strings[-1]
    return None


def _unreadable(path: Path, err: Exception) -> ModelError:
    """One line: torch's own reason (without its advice to set weights_only=False), or the
    exception's type when it gives none."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = re.split(r"\.\s", lines[0])[0][:200] if lines else type(err).__name__  # its first sentence
    return ModelError(f"checkpoint '{path}' is unreadable (truncated or not a checkpoint): {reason}")


def _load_trusted(path: Path, refused: str, map_location: Any, mmap: bool) -> Any:
    if not _TRUSTED.get():
        raise UnsafeCheckpointError(
            f"checkpoint '{path}' needs class '{refused}', which clipft does not load from a file it did not write; "
            f"{TRUST_HINT}"
        )
    log.warning("loading '%s' with weights_only=False (run.trust_checkpoint): it needs '%s', and may run code", path, refused)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:
        raise _unreadable(path, err) from None


def _load_torchscript(path: Path, map_location: Any) -> Any:
    """The weights of a TorchScript archive, only when trusted (loading it runs its code)."""
    if not _TRUSTED.get():
        raise UnsafeCheckpointError(
            f"checkpoint '{path}' is a TorchScript archive, which runs code it carries when loaded; {TRUST_HINT}, "
            "or convert it once where trusted: torch.save(torch.jit.load(FILE).state_dict(), 'weights.pt')"
        )
    log.warning("loading TorchScript archive '%s' with torch.jit.load (run.trust_checkpoint): it may run code", path)
    try:
        return torch.jit.load(str(path), map_location=map_location).state_dict()
    except Exception as err:
        raise _unreadable(path, err) from None


__all__ = ["ALLOWED_GLOBALS", "UnsafeCheckpointError", "load", "trusting"]
