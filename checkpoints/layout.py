"""Where things live inside a checkpoint URI, and the records that describe them.

    URI/step_00000100/                     one checkpoint (its name is also the DeepSpeed tag)
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt, ...
                                           every rank's DeepSpeed files, side by side
        run_state/rank_00000.pt            per rank: step, loader state, RNG states, extra
        markers/rank_00000.json            per rank, written after its files are uploaded:
                                           the files it wrote with sizes, sha256, crc32c
        COMMIT.json                        the manifest, written LAST by rank 0 once every
                                           rank's marker is in; the checkpoint exists for
                                           readers only when this exists and verifies

    URI/LEASE.json                         the job that owns this URI (checkpoints.lease)

There is no "latest" pointer: readers list step folders and trust manifests only.
Format 2 adds crc32c to each file record; format-1 manifests (sha256 only) still load.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
MANIFEST = "COMMIT.json"
MARKERS = "markers"
RUN_STATE = "run_state"
FORMAT_VERSION = 2


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def parse_step_dir(name: str) -> int | None:
    m = STEP_DIR_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def marker_name(rank: int) -> str:
    return f"{MARKERS}/rank_{rank:05d}.json"


def run_state_name(rank: int) -> str:
    return f"{RUN_STATE}/rank_{rank:05d}.pt"


@dataclass
class FileRecord:
    size: int
    sha256: str
    rank: int
    crc32c: str = ""   # base64, as GCS reports it; "" in manifests of format 1


@dataclass
class RankMarker:
    """What one rank uploaded for one checkpoint."""
    rank: int
    step: int
    attempt: str  # id shared by the ranks of one run attempt; stale markers never count
    files: dict[str, FileRecord]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "RankMarker":
        raw = json.loads(data)
        files = {k: FileRecord(**v) for k, v in raw["files"].items()}
        return cls(rank=int(raw["rank"]), step=int(raw["step"]), attempt=str(raw["attempt"]),
                   files=files)


@dataclass
class Manifest:
    """The commit record of one checkpoint."""
    step: int
    world_size: int
    zero_stage: int
    files: dict[str, FileRecord]
    model_config: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    attempt: str = ""
    time: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        """Parse a manifest; raises ValueError describing what is wrong with it."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"manifest is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError("manifest is not a JSON object")
        missing = [k for k in ("step", "world_size", "zero_stage", "files") if k not in raw]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        if int(raw.get("format", 1)) > FORMAT_VERSION:
            raise ValueError(f"manifest format {raw['format']} is newer than this code "
                             f"understands ({FORMAT_VERSION})")
        try:
            files = {k: FileRecord(**v) for k, v in raw["files"].items()}
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"manifest file list is malformed ({exc})") from None
        return cls(step=int(raw["step"]), world_size=int(raw["world_size"]),
                   zero_stage=int(raw["zero_stage"]), files=files,
                   model_config=raw.get("model_config") or {}, config=raw.get("config") or {},
                   mlflow_run_id=raw.get("mlflow_run_id"), attempt=str(raw.get("attempt", "")),
                   time=float(raw.get("time", 0.0)), format=int(raw.get("format", 1)))
