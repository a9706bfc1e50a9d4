"""The pipeline's memory between runs: which stages finished, with which inputs, and how long they took.

A stage is *done* when ``state.json`` records it with the same fingerprint (a hash of everything the stage
depends on: its settings, its input files' contents, the fingerprints of the stages before it) and its outputs
still exist. Anything else — never run, interrupted, a changed setting upstream, a deleted output — runs again.
``state.json`` is rewritten atomically after every stage, so a crash loses at most the stage in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import write_json

STATE_FILE = "state.json"
LOCK_FILE = ".pipeline.lock"


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: a training set edited in place must retrain its adapter."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


@dataclass
class StageRecord:
    fingerprint: str
    seconds: float
    finished: str
    outputs: list[str]


class PipelineState:
    """``state.json`` of one output directory."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / STATE_FILE
        self.stages: dict[str, StageRecord] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.stages = {k: StageRecord(**v) for k, v in raw.get("stages", {}).items()}
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"{self.path} is damaged ({exc}); delete it (or pass --restart) to run every stage again"
                ) from None

    def is_done(self, stage_id: str, fp: str) -> bool:
        record = self.stages.get(stage_id)
        return record is not None and record.fingerprint == fp and all(Path(p).exists() for p in record.outputs)

    def record(self, stage_id: str, fp: str, seconds: float, outputs: list[Path]) -> None:
        self.stages[stage_id] = StageRecord(
            fingerprint=fp, seconds=round(seconds, 3), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            outputs=[str(p) for p in outputs],
        )
        write_json(self.path, {"stages": {k: vars(v) for k, v in self.stages.items()}})

    def forget(self) -> None:
        self.stages = {}
        if self.path.exists():
            self.path.unlink()


class RunLock:
    """One pipeline at a time per output directory: a second run would overwrite the first one's stages."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._holder_alive():
                    raise ConfigError(
                        f"another holdall pipeline (pid {self._holder()}) is writing {self.path.parent}; wait for it, "
                        "or use another output directory"
                    ) from None
                self.path.unlink(missing_ok=True)  # a crashed run's lock: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ConfigError(f"could not take the lock {self.path}; delete it if no pipeline is running")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _holder_alive(self) -> bool:
        pid = self._holder()
        if pid is None or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
