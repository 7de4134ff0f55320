"""The manifest of a streamed run: which blocks are finished, and a checksum of each.

A run writing ``H.npy`` keeps ``H.npy.manifest.json`` (blocks finished by earlier runs,
merged) and one part per process, ``H.npy.manifest.rank{r}.json`` (blocks this process
finished in this run). Each file is replaced atomically (temp file, fsync, rename) after
each block, and a block is only recorded after its data is in the array, so a killed run
leaves manifests that list only blocks that are really there. A resumed run also checks
each recorded block's checksum against the array before it skips the block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hesse.errors import FileFormatError, ResumeMismatchError

from ._atomic import write_atomic

VERSION = 1


def manifest_path(out: Path, rank: int | None = None) -> Path:
    """``OUT.manifest.json`` (merged) or ``OUT.manifest.rank{r}.json`` (one process)."""
    suffix = ".manifest.json" if rank is None else f".manifest.rank{rank}.json"
    return out.with_name(out.name + suffix)


def part_paths(out: Path) -> list[Path]:
    """The per-process manifest parts that exist next to ``out``."""
    if not out.parent.is_dir():
        return []
    prefix = out.name + ".manifest.rank"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))


def digest(data: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order, as ``"sha256:<hex>"``."""
    arr = np.ascontiguousarray(data)
    return "sha256:" + hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a run's configuration (sorted JSON)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """One manifest file: the run's configuration and the blocks it records as done.

    Attributes:
        path: The manifest file.
        config: The run's configuration (JSON-serialisable).
        done: Block id to checksum of the block's bytes.
        complete: Every block of the run is done.
        inputs: Block id to checksum of the block's inputs (iterables of batches, whose
            re-iterated batches a resume checks against these).
    """

    path: Path
    config: dict[str, Any]
    done: dict[int, str] = field(default_factory=dict)
    complete: bool = False
    inputs: dict[int, str] = field(default_factory=dict)

    def mark(self, block_id: int, checksum: str, inputs: str | None = None) -> None:
        """Record a finished block (and its inputs' checksum); save atomically."""
        self.done[block_id] = checksum
        if inputs is not None:
            self.inputs[block_id] = inputs
        self.save()

    def save(self) -> None:
        """Write the manifest atomically (temp file, fsync, rename)."""
        body = {
            "format": "hesse-manifest",
            "version": VERSION,
            "config_hash": config_hash(self.config),
            "config": self.config,
            "complete": self.complete,
            "done": {str(k): v for k, v in sorted(self.done.items())},
        }
        if self.inputs:
            body["inputs"] = {str(k): v for k, v in sorted(self.inputs.items())}
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        write_atomic(self.path, lambda fh: fh.write(data))


def read_manifest(path: Path) -> Manifest:
    """Read one manifest file.

    Raises:
        FileFormatError: The file is not a hesse manifest (corrupt JSON, wrong fields).
    """
    try:
        body = json.loads(path.read_text())
        if body.get("format") != "hesse-manifest" or body.get("version") != VERSION:
            raise ValueError("not a hesse manifest")
        config = body["config"]
        if config_hash(config) != body["config_hash"]:
            raise ValueError("config hash mismatch")
        done = {int(k): str(v) for k, v in body["done"].items()}
        inputs = {int(k): str(v) for k, v in body.get("inputs", {}).items()}
        return Manifest(path, config, done, bool(body.get("complete", False)), inputs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FileFormatError(
            f"hesse compute: the manifest {path} is corrupt ({exc}); delete the output "
            "and its manifests to start again"
        ) from exc


def read_all(out: Path) -> Manifest | None:
    """Merge the manifest and its parts next to ``out`` (``None`` when there are none).

    Raises:
        FileFormatError: A manifest file is corrupt.
        ResumeMismatchError: The files record different configurations.
    """
    paths = [p for p in [manifest_path(out)] if p.is_file()] + part_paths(out)
    if not paths:
        return None
    manifests = [read_manifest(p) for p in paths]
    first = manifests[0]
    merged = Manifest(manifest_path(out), first.config, {}, first.complete)
    for m in manifests:
        if config_hash(m.config) != config_hash(first.config):
            raise ResumeMismatchError(
                f"hesse compute: {m.path} and {first.path} record different runs; delete the "
                "output and its manifests to start again"
            )
        merged.done.update(m.done)
        merged.inputs.update(m.inputs)
    return merged


def consolidate(merged: Manifest, out: Path) -> None:
    """Save ``merged`` as ``OUT.manifest.json``, then delete the parts it includes."""
    merged.path = manifest_path(out)
    merged.save()
    for part in part_paths(out):
        with contextlib.suppress(OSError):
            os.unlink(part)


def remove_all(out: Path, extra: Iterable[Path] = ()) -> None:
    """Delete the manifests of ``out`` (and ``extra`` files)."""
    for p in [manifest_path(out), *part_paths(out), *extra]:
        with contextlib.suppress(OSError):
            os.unlink(p)
