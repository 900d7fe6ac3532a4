"""Atomic outputs: a stage writes under a temporary name and renames last, so a failed or killed
stage never leaves an output that looks finished (Snakemake and DVC judge completion by existence)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from dd.errors import StageError


def _tmp_name(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def publish_dir(work: Path | str, final: Path | str) -> None:
    """Rename a finished work folder (<stage>.partial) to `final`; an older `final` is moved aside first and removed
    after, so `final` is never half old, half new."""
    work, final = Path(work), Path(final)
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, final)


@contextlib.contextmanager
def atomic_dir(final: Path | str):
    """Yield a fresh temporary directory next to `final`; on success it replaces `final`.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and `final`
    is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path | str):
    """Yield a temporary path next to `final`; rename it to `final` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_json(path: Path | str, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def exclusive_lock(folder: Path | str, command: str):
    """Hold an exclusive lock on a stage's partial folder so two runs never write the same shards; a second run
    fails at once with one line naming the folder and the command (`dd pairs`, `dd sample`) that holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{folder}: another `{command}` run is writing here; wait for it or stop it") from None
        yield
    finally:
        os.close(fd)
