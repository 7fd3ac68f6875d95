"""Durable run state: atomic, complete-or-absent checkpoints written by every rank with torch DCP.

A checkpoint is the folder CHECKPOINT_DIR/step-<N>/ (N = global step) holding
- torch.distributed.checkpoint shards (`__<rank>_<i>.distcp` and `.metadata`) of: the TorchRec tables
  (each rank writes its own shards; replicated data-parallel tables once), their optimizer state, and the
  dense parameters and Adam state in unpartitioned form (distributed.dense explains why);
- `manifest.json`: format, step, the data cursor (components.progress), world size, global batch,
  the resolved config, the sharding plan, library versions, the model's signature (stages, table and
  dense shapes) that a load is checked against, and every file with its size and CRC-32.

Commit protocol: every rank writes into `.tmp-step-<N>/`; once DCP has gathered every rank's write
results, rank 0 writes the manifest (temp file, fsync, rename) and renames the folder to `step-<N>`.
So a `step-<N>` folder is complete by construction; a crash during a save leaves a `.tmp-*` folder,
which the next start removes. `manifest.json` is the commit marker: DCP's `.metadata` only marks DCP's
own part, and DeepSpeed's `latest` file is written before its writers finish. Each rank checksums the
files it wrote right after writing them (they are still in the page cache). Before anything is loaded
the manifest, the size and the CRC-32 of every listed file are checked, so a damaged checkpoint (a
missing, truncated or altered shard, no or a broken manifest) is refused before any tensor changes:
`resume=auto` then falls back to the previous complete one with a warning, an explicit path fails
naming the file. Pruning keeps the newest `keep` (>= 2) complete checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import time
import zlib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
"""3: `files` maps each file to {"bytes", "crc32"}; format 2 recorded sizes only. 2: a stage's user tables
in their own collection (`sparse.<stage>.user_ebc`), the item tables in `sparse.<stage>.ebc`."""
_CHUNK_BYTES = 16 << 20
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged or from another model (the message says which)."""


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint folders under `root`, newest first (not yet verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes (zlib's, streamed), as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def read_manifest(path: Path, verify_content: bool = True) -> dict[str, Any]:
    """The manifest of checkpoint folder `path`, after checking that every file it lists is whole: its
    size, and (verify_content) its CRC-32, which reads every file.

    Raises:
        CheckpointError: naming the missing folder, manifest or file, or the truncated or altered file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: {path} is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        format_version = manifest["format"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged ({type(exc).__name__}: {exc})") from None
    if format_version != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: checkpoint format {format_version!r}, this lcron_dist "
                              f"reads format {FORMAT_VERSION}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {manifest_path})")
        actual = file.stat().st_size
        if actual != expected["bytes"]:
            raise CheckpointError(f"{file} is truncated or altered: {actual:,} bytes, the manifest says "
                                  f"{expected['bytes']:,}")
        if verify_content and (crc := file_crc32(file)) != expected["crc32"]:
            raise CheckpointError(f"{file} is altered: its CRC-32 is {crc}, the manifest says {expected['crc32']}")
    return manifest


def first_mismatch(saved: Any, current: Any, where: str) -> str | None:
    """The first difference between two JSON-like values, as 'where: checkpoint has X, this run has Y'."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in saved:
            if key not in current:
                return f"{where}.{key} is in the checkpoint but not in this run"
            found = first_mismatch(saved[key], current[key], f"{where}.{key}")
            if found:
                return found
        extra = [key for key in current if key not in saved]
        return f"{where}.{extra[0]} is in this run but not in the checkpoint" if extra else None
    if saved != current:
        return f"{where}: the checkpoint has {saved}, this run has {current}"
    return None


def config_changes(saved: dict[str, dict], current: dict[str, dict],
                   ignore: tuple[str, ...] = ("run", "checkpoint", "profiling", "ray")) -> list[str]:
    """'section.field: old -> new' for each setting a resumed run changes (sections in `ignore` aside)."""
    return [f"{section}.{name}: {saved[section].get(name)!r} -> {value!r}"
            for section, fields in current.items() if section not in ignore and section in saved
            for name, value in fields.items() if saved[section].get(name) != value]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_dicts(mine: dict) -> dict:
    """Every rank's `mine` merged, on rank 0 (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    return {k: v for part in everyone for k, v in sorted(part.items())} if everyone else {}


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Checkpointer:
    """Saves, finds, verifies and loads a run's checkpoints; every method is called on every rank.

    Args:
        root: the checkpoint folder (checkpoint.dir, default RUN/checkpoints).
        keep: complete checkpoints to keep (>= 2).
        rank: this process's rank (rank 0 commits, prunes and decides what to resume from).
        log: the run's logger.
    """

    def __init__(self, root: Path, keep: int, rank: int, log: logging.Logger) -> None:
        self.root, self.keep, self.rank, self.log = Path(root), keep, rank, log

    # ---- start-up -----------------------------------------------------------------------------

    def remove_leftovers(self) -> None:
        """Delete what an unfinished save left behind (`.tmp-*` folders)."""
        if self.rank == 0 and self.root.is_dir():
            for path in sorted(self.root.glob(f"{_TMP_PREFIX}*")):
                self.log.warning("removing %s, left by a save that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)
        _barrier()

    def resolve(self, resume: str) -> tuple[Path, dict] | None:
        """The checkpoint to start from (path and manifest), decided by rank 0 for every rank.

        Args:
            resume: "auto" (the newest complete checkpoint that verifies, falling back past damaged ones
                with a warning), "none", a checkpoint folder (which must verify), or a folder of
                checkpoints (its newest complete one, as auto).

        Raises:
            CheckpointError: an explicit checkpoint is missing or damaged (on every rank).
        """
        choice: tuple[str, dict] | str | None = None
        if self.rank == 0 and resume != "none":
            try:
                choice = self._choose(resume)
            except CheckpointError as exc:
                choice = f"error: {exc}"
        choice = _broadcast(choice)
        if isinstance(choice, str):
            raise CheckpointError(choice.removeprefix("error: "))
        return (Path(choice[0]), choice[1]) if choice else None

    def _choose(self, resume: str) -> tuple[str, dict] | None:
        root = self.root if resume == "auto" else Path(resume)
        if resume != "auto" and ((root / MANIFEST).exists() or not checkpoint_steps(root)):
            return str(root), read_manifest(root)
        for _, path in checkpoint_steps(root):  # auto, or a checkpoint folder of another run
            try:
                return str(path), read_manifest(path)
            except CheckpointError as exc:
                self.log.warning("skipping damaged checkpoint: %s; falling back to the previous one", exc)
        return None

    # ---- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], manifest: dict[str, Any]) -> Path:
        """Write `state` (a DCP state dict, collective) and commit it as step-<step> with `manifest`.

        Returns:
            The committed folder.
        """
        start = time.perf_counter()
        final = self.root / f"step-{step}"
        tmp = self.root / f"{_TMP_PREFIX}step-{step}"
        exists = _broadcast(self.rank == 0 and self._is_complete(final))
        if exists:  # this exact state was committed before a restart
            return final
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # a damaged folder of the same step
            tmp.mkdir(parents=True)
        _barrier()
        # A file per tensor: DCP's writer holds every tensor of a file until the file is done, and copies
        # each that is a view of a larger buffer (fbgemm keeps a group's tables in one), so one file per
        # rank would hold a copy of all of that rank's tables at once.
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=False))
        checksum_start = time.perf_counter()
        mine = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
                for p in sorted(tmp.rglob("*")) if p.is_file() and self._wrote(p.name)}
        checksum_seconds = time.perf_counter() - checksum_start
        files = _gather_dicts(mine)  # also: every rank's shards are on disk
        if self.rank == 0:
            _write_json_durably(tmp / MANIFEST, {**manifest, "format": FORMAT_VERSION, "step": step, "files": files})
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            size = sum(entry["bytes"] for entry in files.values())
            self.log.info("checkpoint %s: %.1f MiB in %.2f s (rank 0's checksums %.2f s of it)", final, size / 2**20,
                          time.perf_counter() - start, checksum_seconds)
            self._prune()
        _barrier()
        return final

    def _wrote(self, name: str) -> bool:
        """Whether this rank wrote file `name` of a checkpoint: its own DCP files, and rank 0 the rest."""
        owner = re.match(r"__(\d+)_", name)
        return int(owner.group(1)) == self.rank if owner else self.rank == 0

    def _is_complete(self, path: Path) -> bool:
        try:
            read_manifest(path, verify_content=False)
            return True
        except CheckpointError:
            return False

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (never the newest: keep >= 2)."""
        complete = [path for _, path in checkpoint_steps(self.root) if (path / MANIFEST).is_file()]
        for path in complete[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> None:
        """Read checkpoint `path` into the tensors of `state` in place, resharding as needed (collective)."""
        dcp.load(state, checkpoint_id=str(path))


CheckpointCallback = Callable[[Path, dict], None]
"""Called on every rank after a commit with the folder and its manifest (launch/ray_job.py reports it)."""


def library_versions() -> dict[str, str]:
    """Versions of the stack a checkpoint was written with (for its manifest)."""
    versions = {"python": platform.python_version()}
    for package in ("lcron-dist", "torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "deepspeed", "ray", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
