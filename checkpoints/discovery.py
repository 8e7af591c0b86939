"""Finding checkpoints and deciding which one may be loaded.

A checkpoint is loadable only when its manifest (COMMIT.json) parses and every file it lists
is present with the recorded size and content (checkpoints.integrity: by default the
store's own crc32c or one read of the file; `verify="full"` compares sha256, `"size"` only
sizes). Anything else is reported with the reason, never loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from pretrain.errors import UserError
from pretrain.storage import filesystem, join, uri_of

from .integrity import LEVELS, content_problem
from .layout import MANIFEST, Manifest, parse_step_dir, step_dir

DEFAULT_VERIFY = "checksum"

log = logging.getLogger("checkpoints")


@dataclass
class CheckpointInfo:
    step: int
    uri: str                      # the step folder, as a URI
    committed: bool               # a manifest exists and parses
    manifest: Manifest | None
    problems: list[str] = field(default_factory=list)
    size_bytes: int = 0           # bytes present in the folder
    modified: float | None = None  # newest modification time of a file in it (unix)

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


def _check_level(verify: str) -> str:
    if verify not in LEVELS:
        raise ValueError(f"verify={verify!r}: use one of {', '.join(LEVELS)}")
    return verify


def inspect(fs, folder: str, verify: str = DEFAULT_VERIFY) -> CheckpointInfo:
    """Check one step folder against its manifest (`verify`: see checkpoints.integrity)."""
    _check_level(verify)
    step = parse_step_dir(folder)
    if step is None:
        raise ValueError(f"{folder} is not a step folder")
    uri = uri_of(fs, folder)
    try:
        listing = {p[len(folder) + 1:]: info for p, info in fs.find(folder, detail=True).items()}
    except FileNotFoundError:
        listing = {}
    present = {name: int(info.get("size") or 0) for name, info in listing.items()}
    size = sum(present.values())
    modified = max((_mtime(i) for i in listing.values()), default=None)
    if MANIFEST not in present:
        return CheckpointInfo(step, uri, False, None,
                              [f"no commit record ({MANIFEST}): the upload never finished or is "
                               "still in progress"], size, modified)
    try:
        manifest = Manifest.from_json(fs.cat_file(join(folder, MANIFEST)))
    except FileNotFoundError:   # listed a moment ago: retention (another process) deletes it
        return CheckpointInfo(step, uri, False, None,
                              [f"{MANIFEST} vanished while being read: the checkpoint is being "
                               "deleted by retention"], size, modified)
    except ValueError as exc:
        return CheckpointInfo(step, uri, False, None, [f"corrupt {MANIFEST}: {exc}"], size, modified)
    problems = []
    if manifest.step != step:
        problems.append(f"{MANIFEST} says step {manifest.step} but the folder is step {step}")
    for name, rec in sorted(manifest.files.items()):
        if name not in present:
            problems.append(f"missing file {name}")
        elif present[name] != rec.size:
            problems.append(f"{name} has {present[name]} bytes, manifest says {rec.size}")
    if not problems and verify != "size":
        for name, rec in sorted(manifest.files.items()):
            try:
                problem = content_problem(fs, join(folder, name), name, listing[name], rec, verify)
            except FileNotFoundError:
                problem = f"{name} vanished while being read"
            if problem:
                problems.append(problem)
    return CheckpointInfo(step, uri, True, manifest, problems, size, modified)


def _mtime(info: dict) -> float:
    value = info.get("mtime") or 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def step_folders(uri: str) -> tuple[object, list[str]]:
    """(filesystem, step folder paths under uri, oldest first)."""
    fs, root = filesystem(uri)
    fs.invalidate_cache()
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return fs, []
    folders = sorted((e["name"].rstrip("/") for e in entries
                      if e.get("type") == "directory" and parse_step_dir(e["name"]) is not None),
                     key=parse_step_dir)
    return fs, folders


def list_checkpoints(uri: str, verify: str = DEFAULT_VERIFY) -> list[CheckpointInfo]:
    """Every step folder under uri, oldest first, each checked against its manifest."""
    _check_level(verify)
    fs, folders = step_folders(uri)
    return [inspect(fs, f, verify) for f in folders]


def loadable_newest_first(uri: str, verify: str = DEFAULT_VERIFY):
    """The loadable checkpoints under uri, newest first, checked lazily (a caller that takes
    the first one reads only what it needs). Unusable newer ones are skipped with a warning
    that names them and why."""
    fs, folders = step_folders(uri)
    for folder in reversed(folders):
        info = inspect(fs, folder, verify)
        if info.loadable:
            yield info
        else:
            log.warning("checkpoint %s is not loadable (%s); falling back to an older one",
                        info.uri, "; ".join(info.problems))


def latest_committed(uri: str, verify: str = DEFAULT_VERIFY) -> CheckpointInfo | None:
    """The newest loadable checkpoint; newer unusable ones are skipped with a warning."""
    return next(loadable_newest_first(uri, _check_level(verify)), None)


def resolve(uri: str, verify: str = DEFAULT_VERIFY) -> CheckpointInfo:
    """A loadable checkpoint from either a step folder URI or a run's checkpoint root."""
    fs, path = filesystem(uri)
    if parse_step_dir(path) is not None:
        fs.invalidate_cache()
        info = inspect(fs, path, verify)
        if not info.loadable:
            raise UserError(f"checkpoint {uri} cannot be loaded: {'; '.join(info.problems)}. "
                            "Pass a committed step folder (see `pretrain checkpoints list`) or "
                            "the run's checkpoint root to take the newest committed one.")
        return info
    info = latest_committed(uri, verify)
    if info is None:
        raise UserError(f"no committed checkpoint under {uri}; expected step_NNNNNNNN folders "
                        f"holding a {MANIFEST} (see `pretrain checkpoints list {uri}`).")
    return info


def resume_candidates(uri: str, resume_from: str | None,
                      verify: str = DEFAULT_VERIFY) -> Iterator[CheckpointInfo]:
    """What a run with checkpoint.uri=`uri` may resume from, best first (lazily checked).

    `resume_from` None: every loadable checkpoint under uri, newest first (a restore that
    finds one damaged after all moves on to the next). A step number ("1200"): that step
    under uri. A URI: that step folder, or the newest loadable under that root. An explicit
    choice that cannot be loaded is a UserError, never a silent fallback."""
    if resume_from is None or str(resume_from).strip() == "":
        return loadable_newest_first(uri, verify)
    text = str(resume_from).strip()
    target = join(uri, step_dir(int(text))) if text.isdigit() else text
    return iter([resolve(target, verify)])
