"""Finding checkpoints and deciding which one may be loaded.

A checkpoint is loadable only when its manifest (COMMIT.json) parses and every file it lists
is present with the recorded size (and, when asked, the recorded sha256). Anything else is
reported with the reason, never loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pretrain.errors import UserError
from pretrain.storage import filesystem, join, sha256_file, uri_of

from .layout import MANIFEST, Manifest, parse_step_dir

log = logging.getLogger("checkpoints")


@dataclass
class CheckpointInfo:
    step: int
    uri: str                      # the step folder, as a URI
    committed: bool               # a manifest exists and parses
    manifest: Manifest | None
    problems: list[str] = field(default_factory=list)
    size_bytes: int = 0           # bytes present in the folder

    @property
    def loadable(self) -> bool:
        return self.committed and not self.problems

    @property
    def time(self) -> float | None:
        return self.manifest.time if self.manifest else None

    @property
    def world_size(self) -> int | None:
        return self.manifest.world_size if self.manifest else None

    @property
    def zero_stage(self) -> int | None:
        return self.manifest.zero_stage if self.manifest else None

    def summary(self) -> dict:
        return {"step": self.step, "uri": self.uri, "committed": self.committed,
                "loadable": self.loadable, "time": self.time, "size_bytes": self.size_bytes,
                "world_size": self.world_size, "zero_stage": self.zero_stage,
                "problems": list(self.problems)}


def inspect(fs, folder: str, verify_checksums: bool = False) -> CheckpointInfo:
    """Check one step folder against its manifest."""
    step = parse_step_dir(folder)
    if step is None:
        raise ValueError(f"{folder} is not a step folder")
    uri = uri_of(fs, folder)
    try:
        present = {p[len(folder) + 1:]: int(info.get("size") or 0)
                   for p, info in fs.find(folder, detail=True).items()}
    except FileNotFoundError:
        present = {}
    size = sum(present.values())
    if MANIFEST not in present:
        return CheckpointInfo(step, uri, False, None,
                              [f"no commit record ({MANIFEST}): the upload never finished or is "
                               "still in progress"], size)
    try:
        manifest = Manifest.from_json(fs.cat_file(join(folder, MANIFEST)))
    except FileNotFoundError:   # listed a moment ago: retention (another process) deletes it
        return CheckpointInfo(step, uri, False, None,
                              [f"{MANIFEST} vanished while being read: the checkpoint is being "
                               "deleted by retention"], size)
    except ValueError as exc:
        return CheckpointInfo(step, uri, False, None, [f"corrupt {MANIFEST}: {exc}"], size)
    problems = []
    if manifest.step != step:
        problems.append(f"{MANIFEST} says step {manifest.step} but the folder is step {step}")
    for name, rec in sorted(manifest.files.items()):
        if name not in present:
            problems.append(f"missing file {name}")
        elif present[name] != rec.size:
            problems.append(f"{name} has {present[name]} bytes, manifest says {rec.size}")
        elif verify_checksums and sha256_file(join(folder, name), fs) != rec.sha256:
            problems.append(f"{name} fails its sha256 checksum")
    return CheckpointInfo(step, uri, True, manifest, problems, size)


def list_checkpoints(uri: str, verify_checksums: bool = False) -> list[CheckpointInfo]:
    """Every step folder under uri, oldest first, each checked against its manifest."""
    fs, root = filesystem(uri)
    fs.invalidate_cache()
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    folders = sorted((e["name"].rstrip("/") for e in entries
                      if e.get("type") == "directory" and parse_step_dir(e["name"]) is not None),
                     key=parse_step_dir)
    return [inspect(fs, f, verify_checksums) for f in folders]


def latest_committed(uri: str, verify_checksums: bool = False) -> CheckpointInfo | None:
    """The newest loadable checkpoint; newer unusable ones are skipped with a warning."""
    for info in reversed(list_checkpoints(uri, verify_checksums)):
        if info.loadable:
            return info
        log.warning("checkpoint %s is not loadable (%s); falling back to an older one",
                    info.uri, "; ".join(info.problems))
    return None


def resolve(uri: str, verify_checksums: bool = False) -> CheckpointInfo:
    """A loadable checkpoint from either a step folder URI or a run's checkpoint root."""
    fs, path = filesystem(uri)
    if parse_step_dir(path) is not None:
        fs.invalidate_cache()
        info = inspect(fs, path, verify_checksums)
        if not info.loadable:
            raise UserError(f"checkpoint {uri} cannot be loaded: {'; '.join(info.problems)}. "
                            "Pass a committed step folder (see `pretrain checkpoints list`) or "
                            "the run's checkpoint root to take the newest committed one.")
        return info
    info = latest_committed(uri, verify_checksums)
    if info is None:
        raise UserError(f"no committed checkpoint under {uri}; expected step_NNNNNNNN folders "
                        f"holding a {MANIFEST} (see `pretrain checkpoints list {uri}`).")
    return info
