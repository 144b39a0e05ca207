"""Test helper for tests/test_multinode.py, loaded at start-up through PYTHONPATH: with
CLIPFT_WRITE_AUDIT=<file> and CLIPFT_WRITE_AUDIT_ROOT=<folder> set, every file or folder this
process creates, opens for writing, renames or removes under the folder is appended to the
file as "<rank>\\t<event>\\t<path>" (rank: RANK or SLURM_PROCID, '-' for a launcher), so a test
can tell which rank wrote what. Python-level writes only (an audit hook, PEP 578)."""

import os
import sys

_log_path, _root = os.environ.get("CLIPFT_WRITE_AUDIT"), os.environ.get("CLIPFT_WRITE_AUDIT_ROOT")
if _log_path and _root:
    _log = open(_log_path, "a", buffering=1)  # opened before the hook: its writes are not events
    _root = os.path.abspath(_root) + os.sep
    _rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "-"))
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _PATH_EVENTS = {"os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"}
    _TARGET_EVENTS = {"os.rename", "shutil.move", "shutil.copyfile"}  # (source, target, ...)

    def _audit(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE)):
                return
        elif event in _PATH_EVENTS:
            path = args[0]
        elif event in _TARGET_EVENTS:
            path = args[1]
        else:
            return
        if isinstance(path, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(path))
            if path.startswith(_root):
                _log.write(f"{_rank}\t{event}\t{path}\n")

    sys.addaudithook(_audit)
