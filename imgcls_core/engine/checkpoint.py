"""Checkpoints: one ``checkpoint.pt`` per directory, loadable with ``weights_only=True``.

A checkpoint directory holds everything to resume exactly (engine state, RNG
states) and everything to serve (config, class names, input size, mean/std),
plus human-readable copies (``config.yaml``, ``class_index.json``,
``metrics.json``). Every file is written to a temporary name, flushed to disk
(fsync) and then renamed into place, so a crash or a full disk mid-save never
leaves a truncated file under the final name.

``CheckpointDir`` keeps a run's epoch checkpoints. A save is staged in a hidden
folder beside the checkpoints (same filesystem), flushed to disk, sealed with a
``COMPLETE`` marker (epoch, size and sha256 of ``checkpoint.pt``) and only then
renamed into ``epoch_NNNN``; the older checkpoints are pruned after that. A
process killed at any point therefore leaves the previous checkpoints intact,
and ``CheckpointDir.load_latest`` resumes from the newest one that actually
loads, naming any it had to skip.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from imgcls_core.config import flat_config
from imgcls_core.data.preprocessing import Preprocessing  # saved with every checkpoint and model

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
COMPLETE_FILE = "COMPLETE"  # written last into a checkpoint directory: its presence means the save finished
FORMAT_VERSION = 1

Log = Callable[[str], None]


def git_revision() -> str:
    """The source revision, or "unknown" (e.g. inside a Ray working_dir without .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries (files created or renamed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open directories: nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories; their renames are durable anyway
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _replace_durably(write: Callable[[Path], None], path: Path) -> None:
    """``write(tmp)``, flush it to disk, rename it to ``path`` and flush the rename; no partial ``path`` ever."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        full = not isinstance(exc, OSError) and _disk_full(path.parent)  # before the half file is removed
        tmp.unlink(missing_ok=True)  # e.g. a disk that filled up mid-write: leave no half file behind
        if full:  # torch reports a full disk as an obscure RuntimeError ("unexpected pos ...")
            reason = f"{os.strerror(errno.ENOSPC)} while writing {path} ({_first_line(exc)})"
            raise OSError(errno.ENOSPC, reason) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


def _atomic_save(obj: Any, path: Path) -> None:
    def write(tmp: Path) -> None:
        # Our own file object, closed even when torch fails mid-write: a half-written file that
        # stayed open in a lingering traceback would keep its blocks on a full disk after unlink.
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    _replace_durably(write, path)


def write_text_durably(path: Path, text: str) -> None:
    """``path`` holds ``text`` once this returns, or is as it was: never a partial file."""
    _replace_durably(lambda tmp: tmp.write_text(text), path)


def save_checkpoint(
    directory: str | Path,
    engine_state: dict[str, Any],
    config: dict[str, Any],
    preprocessing: Preprocessing,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<directory>/checkpoint.pt`` and its readable companions; returns the directory.

    ``extra`` holds the caller's own plain values (strings, numbers), e.g. a tracking run id."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        **engine_state,
        "config": config,
        "preprocessing": preprocessing.to_dict(),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
        "git_rev": git_revision(),
    }
    _atomic_save(payload, directory / CHECKPOINT_FILE)
    write_text_durably(directory / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_text_durably(directory / "class_index.json", json.dumps({"classes": preprocessing.classes}, indent=1))
    write_text_durably(directory / "metrics.json", json.dumps(payload["metrics"], indent=1))
    return directory


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file or directory safely (``weights_only=True``)."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise ValueError(f"checkpoint {file} is unreadable or not an imgcls checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {file} has format {payload.get('format_version') if isinstance(payload, dict) else '?'}; "
                         f"this version of imgcls reads format {FORMAT_VERSION}")
    return payload


def check_same_model(state: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Refuse to resume weights into a differently configured network."""
    if state["config"]["model"] != config["model"]:
        changed = sorted(k for k in config["model"] if state["config"]["model"].get(k) != config["model"][k])
        raise ValueError(
            f"checkpoint {where} was trained with a different model config (changed: {changed}); "
            f"start a new run in another train.output_dir (and ray.name)"
        )


# Settings a resumed run takes from its checkpoint rather than from its config (the optimizer's state and
# param groups, the LR schedule built for the epochs and steps per epoch, the EMA): a resume that changes
# one would silently train with the old value, so it is refused.
RESUME_FIXED = ("optim", "train.epochs", "data.batch_size", "train.ema_decay", "train.ema_steps")


def check_same_schedule(state: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Refuse to resume with other optimizer, schedule or EMA settings than the checkpoint's
    (population-based training's perturbations go through Engine.adopt_state instead)."""
    def fixed(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in flat_config(cfg).items() if k in RESUME_FIXED or k.partition(".")[0] in RESUME_FIXED}

    was, now = fixed(state["config"]), fixed(config)
    changed = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if changed:
        raise ValueError(
            f"checkpoint {where} was trained with other training settings ({'; '.join(changed)}); a resumed run "
            f"keeps its optimizer, LR schedule and EMA, so they would not apply: start a new run in another "
            f"train.output_dir (and ray.name), or resume with the checkpoint's settings"
        )


class CheckpointSaveError(OSError):
    """A checkpoint could not be saved (a full disk, a failing write); the checkpoints saved before are intact.

    ``errno`` is the underlying error's when there is one (``errno.ENOSPC`` for a full disk)."""


# Crash points for the durability tests: ``CheckpointDir.save`` calls ``_HOOKS[name](path)`` when set, and the
# tests set one in a child process to kill it exactly there. "sealed": the staging folder is complete (marker
# written) but not yet renamed into place; "old_set_aside": a checkpoint of the same epoch has been renamed aside
# and the new one is not yet in its place. Empty in normal use.
_HOOKS: dict[str, Callable[[Path], None]] = {}

# Names of the hidden folders this process's saves are using right now. A leftover that carries this process's pid
# but is not listed here was left by an earlier process with the same pid (pids repeat, e.g. in a restarted
# container), so it is stale.
_ACTIVE: set[str] = set()

_HIDDEN = re.compile(r"^\.(staging|aside|trash)-(epoch_\d{4,})-(\d+)-[0-9a-f]+$")


def _hook(name: str, path: Path) -> None:
    if (hook := _HOOKS.get(name)) is not None:
        hook(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        return True
    return True


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):  # the files, then the directory listing them
        for name in filenames:
            _fsync_file(Path(dirpath, name))
        _fsync_dir(Path(dirpath))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _verify_seal(directory: Path) -> None:
    """Check ``checkpoint.pt`` against the directory's completion marker, when it has one (checkpoints of older
    versions of imgcls and Ray Train's checkpoint folders have none); ValueError says what does not match."""
    marker = directory / COMPLETE_FILE
    if not marker.is_file():
        return
    try:
        seal = json.loads(marker.read_text())
        size, digest = int(seal["size"]), str(seal["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"its completion marker {COMPLETE_FILE} is unreadable: {exc}") from exc
    file = directory / CHECKPOINT_FILE
    if not file.is_file():
        raise ValueError(f"{CHECKPOINT_FILE} is missing")
    if (actual := file.stat().st_size) != size:
        raise ValueError(f"{CHECKPOINT_FILE} has {actual:,} bytes, the completion marker recorded {size:,}")
    if file_sha256(file) != digest:
        raise ValueError(f"{CHECKPOINT_FILE} does not match the sha256 its completion marker recorded")


def _why_unreadable(exc: BaseException) -> str:
    # load_checkpoint wraps torch's error in "checkpoint X is unreadable ...: <torch's reason>": keep the reason
    cause = exc.__cause__ if isinstance(exc, ValueError) and exc.__cause__ is not None else exc
    return _first_line(cause)


def load_first_readable(
    paths: Iterable[str | Path], map_location: str | torch.device = "cpu", log: Log = print,
) -> tuple[dict[str, Any], Path]:
    """Load the first of ``paths`` (checkpoint directories or files, newest first) that is intact; ``(state, path)``.

    A directory with a completion marker must match it (size and sha256 of ``checkpoint.pt``), then the file must
    load with ``load_checkpoint``. The ones skipped are named in one log line, with why, together with the one
    resumed from instead. ValueError, naming every one tried and why, when none loads."""
    failures: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        try:
            if path.is_dir():
                _verify_seal(path)
            state = load_checkpoint(path, map_location=map_location)
        except (OSError, ValueError) as exc:
            failures.append((path, _why_unreadable(exc)))
            continue
        if failures:
            log("; ".join(f"checkpoint {p} is unreadable ({why})" for p, why in failures)
                + f"; resuming from the previous complete one, {path}")
        return state, path
    if not failures:
        raise ValueError("no checkpoint to load (the list of checkpoints is empty)")
    tried = "\n".join(f"  {p}: {why}" for p, why in failures)
    raise ValueError(
        f"none of the {len(failures)} checkpoint(s) loads:\n{tried}\n"
        "move them away to start from scratch, or restore them from a backup"
    )


class CheckpointDir:
    """Epoch checkpoints under ``<root>/epoch_NNNN``; keeps the newest ``keep`` of them.

    ``save`` writes one crash-safely (see the module docstring), ``load_latest`` reads back the newest that loads.
    Only complete checkpoints are listed: sealed by ``save`` (a ``COMPLETE`` marker), or written by an older
    version of imgcls (a ``checkpoint.pt`` without marker)."""

    _PATTERN = re.compile(r"^epoch_(\d{4,})$")

    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the checkpoint just saved), got {keep}")
        self.root, self.keep = Path(root), keep

    @staticmethod
    def is_complete(directory: Path) -> bool:
        return (directory / COMPLETE_FILE).is_file() or (directory / CHECKPOINT_FILE).is_file()

    def epochs(self) -> list[tuple[int, Path]]:
        """The complete checkpoints as ``(epoch, directory)``, oldest first.

        Listing changes nothing on disk. A checkpoint that a save set aside to replace it and that is not yet
        (or, the process killed, never) replaced is listed under its aside folder until a save puts it back."""
        if not self.root.is_dir():
            return []
        found: dict[int, Path] = {}
        aside: dict[int, Path] = {}
        for child in sorted(self.root.iterdir()):
            if (match := self._PATTERN.match(child.name)) and self.is_complete(child):
                found[int(match.group(1))] = child  # an interrupted save of an older version has no file
            elif (match := _HIDDEN.match(child.name)) and match.group(1) == "aside" and self.is_complete(child):
                aside.setdefault(int(match.group(2).removeprefix("epoch_")), child)
        return sorted({**aside, **found}.items())

    def latest(self) -> Path | None:
        found = self.epochs()
        return found[-1][1] if found else None

    def path_for(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:04d}"

    def save(self, epoch: int, write: Callable[[Path], None]) -> Path:
        """Save the checkpoint of ``epoch`` crash-safely; returns its directory, ``<root>/epoch_NNNN``.

        ``write(folder)`` writes the checkpoint's files (typically ``save_checkpoint(folder, ...)``) into a hidden
        staging folder under ``root``, on the same filesystem as the checkpoints. Every file is then flushed to
        disk, the ``COMPLETE`` marker (epoch, size and sha256 of ``checkpoint.pt``) is written last, and the folder
        is renamed into place; a checkpoint of the same epoch (a mid-epoch one) is replaced only once the new one
        is whole. Only then are the checkpoints beyond the newest ``keep`` removed, and with them any numbered
        above ``epoch``: those belong to an earlier attempt that this run restarted before (from an older
        checkpoint or from scratch), and ``latest()`` must be this run's newest.

        When anything fails before the rename (a full disk: ``errno.ENOSPC``), the staging folder is removed and
        ``CheckpointSaveError`` says so; the checkpoints saved before are untouched. Folders left by a process
        killed mid-save are tidied up first (see ``recover``); those of a live process are left alone. One
        process saves into a root at a time (``lock_output_dir`` sees to that for a run's output folder): the
        liveness check goes by pid, on this host.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.recover()
        staging = self._hidden("staging", self.path_for(epoch).name)
        try:
            staging.mkdir()
            write(staging)
            self._seal(staging, epoch)
            _hook("sealed", staging)
        except BaseException as exc:
            error = self._save_error(epoch, staging, exc) if isinstance(exc, Exception) else None
            shutil.rmtree(staging, ignore_errors=True)
            _ACTIVE.discard(staging.name)
            if error is None:  # KeyboardInterrupt, SystemExit: tidied up, nothing to explain
                raise
            raise error from exc
        try:
            target = self._publish(staging, epoch)
        except Exception as exc:
            if not staging.exists():  # it is in place; what failed came after
                raise
            error = self._save_error(epoch, staging, exc)
            shutil.rmtree(staging, ignore_errors=True)
            raise error from exc
        finally:
            _ACTIVE.discard(staging.name)
        self._prune(epoch)
        return target

    def commit(self, source: Path, epoch: int) -> Path:
        """Move a finished checkpoint directory (e.g. one ``save_checkpoint`` wrote to a temporary folder) into
        place the way ``save`` does; ``source`` is consumed."""
        source = Path(source)

        def move_in(staging: Path) -> None:
            for child in source.iterdir():
                shutil.move(str(child), staging / child.name)  # a rename, or a copy from another filesystem

        target = self.save(epoch, move_in)
        shutil.rmtree(source, ignore_errors=True)
        return target

    def load_latest(
        self, map_location: str | torch.device = "cpu", log: Log = print,
    ) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, as ``(state, directory)``; None when there is no checkpoint.

        One that does not load (truncated, corrupted: ``checkpoint.pt`` differs from its completion marker, or
        torch cannot read it) is skipped with one log line naming it, why, and the one resumed from instead.
        ValueError, naming each one tried, when there are checkpoints but none of them loads."""
        found = self.epochs()
        if not found:
            return None
        return load_first_readable([path for _, path in reversed(found)], map_location=map_location, log=log)

    def recover(self) -> None:
        """Tidy up after processes killed mid-save: put back a checkpoint one had set aside to replace it with a
        new one of the same epoch when the new one never arrived, and remove staging and half-deleted folders.
        The folders of live processes (and this process's saves in progress) are left alone."""
        if not self.root.is_dir():
            return
        stale = []
        for child in self.root.iterdir():
            match = _HIDDEN.match(child.name)
            if match is None:
                continue
            pid = int(match.group(3))
            if (child.name in _ACTIVE) if pid == os.getpid() else _pid_alive(pid):
                continue
            stale.append((match.group(1), self.root / match.group(2), child))
        for kind, target, folder in sorted(stale, key=lambda item: item[0] != "aside"):  # put checkpoints back first
            if kind == "aside" and self.is_complete(folder) and not self.is_complete(target):
                if target.exists():
                    shutil.rmtree(target)  # an interrupted save of an older version: not a checkpoint
                os.rename(folder, target)
                _fsync_dir(self.root)
            else:
                shutil.rmtree(folder, ignore_errors=True)

    def _hidden(self, kind: str, name: str) -> Path:
        folder = f".{kind}-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        _ACTIVE.add(folder)
        return self.root / folder

    def _seal(self, staging: Path, epoch: int) -> None:
        file = staging / CHECKPOINT_FILE
        if not file.is_file():
            raise FileNotFoundError(f"the checkpoint writer wrote no {CHECKPOINT_FILE}")
        _fsync_tree(staging)
        seal = {
            "epoch": epoch, "file": CHECKPOINT_FILE, "size": file.stat().st_size, "sha256": file_sha256(file),
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": socket.gethostname(), "pid": os.getpid(),
        }
        with (staging / COMPLETE_FILE).open("w") as fh:
            fh.write(json.dumps(seal, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(staging)

    def _publish(self, staging: Path, epoch: int) -> Path:
        target = self.path_for(epoch)
        aside = None
        if target.exists():  # never delete it before the new one is in its place
            aside = self._hidden("aside", target.name)
            os.rename(target, aside)
            _hook("old_set_aside", aside)
        try:
            os.rename(staging, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
                _ACTIVE.discard(aside.name)
            raise
        _fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # what is left of it is tidied by a later save
            _ACTIVE.discard(aside.name)
        return target

    def _prune(self, epoch: int) -> None:
        found = [(e, path) for e, path in self.epochs() if self._PATTERN.match(path.name)]  # not a live save's aside
        doomed = [path for e, path in found if e <= epoch][: -self.keep] + [path for e, path in found if e > epoch]
        for old in doomed:
            trash = self._hidden("trash", old.name)  # renamed first, so a half-deleted one is never listed
            try:
                os.rename(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass
            finally:
                _ACTIVE.discard(trash.name)

    def _save_error(self, epoch: int, staging: Path, exc: Exception) -> CheckpointSaveError:
        kept = ", ".join(path.name for _, path in self.epochs()) or "none yet"
        code = next((e.errno for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError) and e.errno),
                    None)
        if code is None and _disk_full(self.root):  # measured while the unfinished copy still fills the disk
            code = errno.ENOSPC
        try:
            where = f"; its filesystem had {_size(shutil.disk_usage(self.root).free)} free"
        except OSError:
            where = ""
        error = CheckpointSaveError(
            f"could not save the checkpoint of epoch {epoch} in {self.root}: {_first_line(exc)}. The unfinished "
            f"copy ({staging.name}) was removed; the checkpoints saved before are intact ({kept}){where}"
        )
        error.errno = code
        return error


def save_inference_model(
    path: str | Path, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
    preprocessing: Preprocessing, metrics: dict[str, float] | None = None, weights: dict[str, Any] | None = None,
) -> Path:
    """The deployable artifact: weights + how to rebuild the network + preprocessing (and, from a
    training run, which weights these are: ``weights``, see TrainingSession's final_weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "model": state_dict,
            "model_config": model_config,
            "preprocessing": preprocessing.to_dict(),
            "metrics": dict(metrics or {}),
            "weights": dict(weights or {}),
            "git_rev": git_revision(),
        },
        path,
    )
    return path
