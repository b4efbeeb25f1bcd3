"""Adapter folders on disk: atomic writes that an interruption cannot leave half-done, and
reading a saved folder's config and weights (peft's file names, its older pickled format too).

Writes are atomic: both files go into a temporary folder next to the destination, are flushed,
and the folder is swapped into place in one rename; a crash leaves the previous complete folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from peftlab.errors import AdapterFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older peft releases pickled the tensors


# --------------------------------------------------------------------------------------------
# Atomic folders
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder's new content in a temporary folder, then swap it into ``path`` at once.

        with atomic_dir("runs/ckpt") as tmp:     # tmp: runs/.ckpt.tmp-<pid>-<random>/
            (tmp / "state.pt").write_bytes(...)  # write everything here
        # on leaving: fsync every file and tmp, then swap tmp into runs/ckpt

    If the block raises, the temporary folder is deleted and ``path`` is untouched. If the
    process dies inside the block, only a hidden ``.<name>.tmp-<pid>-*`` folder is left; the next
    ``atomic_dir`` for the same path removes it. The folder is replaced as a whole: files in the
    old one that the block does not write again are gone afterwards.
    """
    dest = Path(path).expanduser().resolve()  # a symlink: replace the folder it points to
    if dest.exists() and not dest.is_dir():
        raise AdapterFileError(
            f"{dest} is a file, so a folder cannot be written there. Expected a folder path "
            "(new or existing). Try another path, e.g. its name without an extension."
        )
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _recover_interrupted(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as err:
        if not _denied(err):
            raise
        raise _permission_error(dest, err) from err
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _denied(err):
            raise
        raise _permission_error(dest, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _denied(err: OSError) -> bool:
    """Permission denied, not permitted (e.g. an immutable folder), or a read-only file system."""
    import errno

    return isinstance(err, PermissionError) or err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def _permission_error(dest: Path, err: OSError) -> AdapterFileError:
    return AdapterFileError(
        f"Cannot write {dest}: permission denied or read-only ({err.strerror or err}). Expected a folder you can "
        "write to (peftlab writes a temporary folder next to it, then renames it into place). "
        "Try a path in your home or working directory."
    )


def _fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder, to disk: a rename is only as durable as its content."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open folders; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    Returns False where the system or file system cannot do it; the caller then falls back to
    two renames."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    if not ok and ctypes.get_errno() not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: fall back
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))
    return ok


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)  # atomic: dest appears complete or not at all
    elif _exchange(tmp, dest):  # atomic: dest holds the old folder, then the new one
        shutil.rmtree(tmp)  # tmp now holds the old content
    else:
        # Two renames. Between them dest is absent, but both complete versions exist on disk;
        # _recover_interrupted puts the old one back if a crash lands exactly there.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        shutil.rmtree(old)
    _fsync_dir(dest.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _recover_interrupted(dest: Path) -> None:
    """Tidy up after a writer of ``dest`` that died: delete its temporary folders, and if it died
    between the two renames of the fallback swap, put the old complete folder back."""
    for kind in ("tmp", "old"):
        for leftover in sorted(dest.parent.glob(f".{dest.name}.{kind}-*")):
            try:
                pid = int(leftover.name[len(f".{dest.name}.{kind}-"):].split("-", 1)[0])
            except ValueError:
                continue
            if _pid_alive(pid) and pid != os.getpid():
                continue  # another process is writing right now: not ours to touch
            if kind == "old" and not dest.exists():
                os.rename(leftover, dest)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reading a saved folder
# --------------------------------------------------------------------------------------------
def adapter_folder(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a folder holding an adapter; clear errors otherwise."""
    folder = Path(path).expanduser()
    if folder.is_file():
        hint = (
            f"Try its folder, {str(folder.parent)!r}."
            if folder.name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
            else "Try the folder that save_adapter wrote."
        )
        raise AdapterFileError(
            f"{folder} is a file. Expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}. {hint}"
        )
    if not folder.is_dir():
        leftovers = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
        note = f" A save to it was interrupted; the previous adapter is in {leftovers[0]}." if leftovers else ""
        raise AdapterFileError(
            f"Adapter folder {folder} does not exist.{note} Expected a folder written by "
            "peftlab.save_adapter or peft's save_pretrained. Check the path (offline, hub ids "
            "cannot be downloaded)."
        )
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterFileError(
            f"{folder} has no {CONFIG_NAME}. Expected a folder holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}, as peftlab.save_adapter and peft write them. Try the folder that "
            "holds both (for several peft adapters, a subfolder per adapter name)."
        )
    if not (folder / WEIGHTS_NAME).is_file() and not (folder / LEGACY_WEIGHTS_NAME).is_file():
        raise AdapterFileError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter's weights are missing. "
            "Expected both files; the save was probably incomplete or the file was not copied. "
            "Save the adapter again, or copy the whole folder."
        )
    return folder


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json as a dict, with a clear error when it is not valid JSON."""
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} is not valid JSON ({err}). Expected the config file peft or "
            "peftlab.save_adapter writes. The file is corrupt or truncated: save the adapter again."
        ) from err
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} has no 'peft_type' field. Expected a peft adapter config "
            "(e.g. {\"peft_type\": \"LORA\", \"r\": 8, ...}). Check that this is an adapter folder."
        )
    return raw


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors (or an older peft's adapter_model.bin)."""
    file = folder / WEIGHTS_NAME
    try:
        if file.is_file():
            from safetensors.torch import load_file

            return load_file(file)
        file = folder / LEGACY_WEIGHTS_NAME
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors raises its own error type for truncated headers/data
        raise AdapterFileError(
            f"{file} cannot be read ({type(err).__name__}: {err}). Expected a complete "
            f"{file.suffix[1:]} file; it is truncated or corrupt (an interrupted copy or download?). "
            "Save or copy the adapter again."
        ) from err
