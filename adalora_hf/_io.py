"""Crash-safe writes: after a crash at any point, a file or an adapter directory holds either
its old content or its new content, never a mix that loads.

- One file (``write_file_atomic``): the bytes go to ``<file>.tmp-<pid>`` next to it, are
  flushed to disk (``fsync``) and renamed over the file (``os.replace``, atomic on POSIX and
  Windows); the directory entry is then synced.
- An adapter directory (``write_files_atomic``):

  1. the directory does not exist yet: the files are written into ``<dir>.tmp-<pid>``, synced,
     and the directory is renamed into place;
  2. it exists and holds nothing but files this save rewrites: the same, then the two
     directories are exchanged (``renameat2(RENAME_EXCHANGE)`` on Linux, atomic; elsewhere
     the old one is renamed to ``<dir>.bak-<pid>``, the new one in, and the backup removed: a
     crash between the two renames leaves the previous adapter complete in ``<dir>.bak-<pid>``,
     which the loader's "not found" error points to);
  3. it holds other files (a tokenizer, a README, another adapter's subdirectory), or it
     cannot be renamed (the working directory or an ancestor of it, a mount point such as a
     container volume, a parent without write permission): other files are never touched,
     and each adapter file is replaced atomically on its own, the weights
     first and ``adapter_config.json`` last. A crash between the two replacements leaves a new
     weights file next to the old config; the weights carry a copy of the config fields that
     give them their meaning (``adapter_model.safetensors`` metadata ``adalora_config``), so
     the loader sees the mix and refuses it with an error that says to save again.

A temporary left behind by a killed process (``*.tmp-<pid>``) is never read by the loaders.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import shutil
import sys
from collections.abc import Mapping

__all__ = ["interrupted_save_hint", "write_file_atomic", "write_files_atomic"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    # makes a rename durable; some file systems (and Windows) cannot open a directory
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary sibling, fsync, ``os.replace``)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(rc == 0)


def _only_ours(directory: str, names: Mapping[str, bytes]) -> bool:
    """Whether ``directory`` holds nothing but regular files named in ``names`` (or their
    temporaries left by a killed save)."""
    if os.path.islink(directory):
        return False
    stale = re.compile("(?:" + "|".join(re.escape(n) for n in names) + r")\.tmp-\d+")
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            return False
        if entry.name not in names and not stale.fullmatch(entry.name):
            return False
    return True


def _can_swap(directory: str, parent: str) -> bool:
    """Whether the directory itself may be renamed: not the working directory or one of its
    ancestors, not a mount point (a volume), and its parent is writable."""
    cwd = os.getcwd()
    if cwd == directory or cwd.startswith(directory.rstrip(os.sep) + os.sep):
        return False
    return not os.path.ismount(directory) and os.access(parent, os.W_OK)


def write_files_atomic(directory: str | os.PathLike[str], files: Mapping[str, bytes]) -> str:
    """Write ``files`` (name -> bytes, in that order) into ``directory`` crash-safely.

    Returns how: ``"created"`` (a new directory renamed into place), ``"swapped"`` (the
    directory held only these files and was replaced as a whole) or ``"per-file"`` (it holds
    other entries, left untouched; each file replaced atomically). See the module docstring.
    Raises ``ValueError`` when ``directory`` is an existing file.
    """
    directory = os.path.abspath(os.fspath(directory))  # ".", "./x/" and "x" alike
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is a file; pass a directory to save into.")
    parent = os.path.dirname(directory)
    if os.path.isdir(directory) and (
        not _only_ours(directory, files) or not _can_swap(directory, parent)
    ):
        for name, data in files.items():  # 3) other files live here: one file at a time
            write_file_atomic(os.path.join(directory, name), data)
        return "per-file"
    os.makedirs(parent, exist_ok=True)
    tmp = f"{directory}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        os.mkdir(tmp)
        for name, data in files.items():
            _write_synced(os.path.join(tmp, name), data)
        _fsync_dir(tmp)
        if not os.path.isdir(directory):  # 1) a new directory
            os.rename(tmp, directory)
            _fsync_dir(parent)
            return "created"
        shutil.copymode(directory, tmp)
        if _exchange(tmp, directory):  # 2) swap old and new in one step; tmp is the old now
            _fsync_dir(parent)
            _remove(tmp)
            return "swapped"
        backup = f"{directory}.bak-{os.getpid()}"
        _remove(backup)
        os.rename(directory, backup)
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(backup, directory)
            raise
        _fsync_dir(parent)
        _remove(backup)
        return "swapped"
    except BaseException:
        _remove(tmp)
        raise


def interrupted_save_hint(path: str | os.PathLike[str]) -> str:
    """A sentence for "not found" errors when a killed save left ``<path>.bak-<pid>`` behind
    (the previous adapter, complete), else an empty string."""
    path = os.fspath(path).rstrip("/\\")
    backups = sorted(glob.glob(glob.escape(path) + ".bak-*"))
    if not backups:
        return ""
    return (
        f" A save into it was interrupted: the previous content is complete in {backups[-1]!r}; "
        f"rename it to {path!r} to use it."
    )
