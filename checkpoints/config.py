"""The `checkpoint` section of the experiment config.

Composed into the config tree by pretrain/train/config.py as `checkpoint: CheckpointConfig`.
Fields are declared with `config_field` (help, min/max), so pretrain/config_loader.py checks
their types and ranges; `validate` holds the cross-field rules.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config_loader import config_field
from pretrain.errors import UserError


@dataclass
class CheckpointConfig:
    uri: str | None = config_field(
        None, "Where checkpoints live: a local folder or any fsspec URI (gs://bucket/run, "
        "s3://..., file://...). None disables checkpointing.")
    every_steps: int = config_field(
        1000, "Save a checkpoint every this many optimizer steps.", min=1)
    keep_last: int = config_field(
        3, "Keep this many newest committed checkpoints (older ones are deleted once "
        "superseded).", min=1)
    keep_every: int = config_field(
        0, "Also keep every checkpoint whose step is a multiple of this (0: none).", min=0)
    max_uploads_in_flight: int = config_field(
        2, "Checkpoints being uploaded at once; a save waits when this many are still uploading "
        "(back-pressure instead of filling the local disk).", min=1, max=16)
    upload_retries: int = config_field(
        5, "Retries per file on transient storage errors (exponential back-off).", min=0, max=20)
    upload_threads: int = config_field(
        4, "Parallel file transfers per checkpoint, per rank.", min=1, max=64)
    snapshot_in_memory: bool = config_field(
        True, "Copy the state to host memory during the save and write the files in the "
        "background (shortest stall; costs RAM for one state copy per checkpoint in flight). "
        "false: DeepSpeed writes the files to local_dir while training waits.")
    local_dir: str = config_field(
        "/tmp/pretrain-checkpoints", "Node-local staging folder: ranks write here first, uploads "
        "read from here, restores download here. Each save first checks that it has room for "
        "the node's ranks' files (about the previous save's size) and stops the run, naming it, "
        "when it has not.")
    commit_timeout_s: float = config_field(
        3600.0, "How long rank 0 waits for every rank's upload before giving up on a checkpoint "
        "(it then stays uncommitted and is never loaded).", min=1.0)
    preempt_grace_s: float = config_field(
        120.0, "On SIGTERM: time allowed to write a final checkpoint and finish uploads before "
        "exiting.", min=0.0)
    stop_after_step: int = config_field(
        0, "Stop after this step as if preempted (final checkpoint, clean exit) and leave the "
        "rest for a later resume; trains a run in slices. 0: run to train.steps.", min=0)
    resume: bool = config_field(
        True, "Resume from the newest committed checkpoint under `uri` if there is one.")
    resume_from: int | str | None = config_field(
        None, "Resume from this checkpoint instead of the newest one that verifies: a step "
        "number under `uri` (e.g. 1200) or a URI (a step folder, or another run's checkpoint "
        "root to take its newest). null: the newest checkpoint under `uri` that verifies.")
    verify_checksums: bool = config_field(
        True, "Check sha256 of every downloaded file against the manifest when restoring "
        "(a checkpoint that fails is skipped for the next older one).")
    max_failed_uploads: int = config_field(
        3, "Stop the run with an error after this many checkpoints in a row could not be "
        "uploaded (a single failure followed by good uploads does not stop it).", min=1)
    lease_timeout_s: float = config_field(
        300.0, "The running job holds a lease on `uri` and renews it; another job is refused "
        "while the lease is fresh, and takes it over once its holder stopped renewing it for "
        "this long (a crashed or preempted job).", min=10.0)
    take_over_lease: bool = config_field(
        False, "Take the lease on `uri` even though another job holds it and is still "
        "renewing it (that job then stops at its next renewal). Only when you know it is gone "
        "or must be replaced.")

    def validate(self) -> None:
        if self.keep_every and self.keep_every % self.every_steps:
            raise UserError(
                f"checkpoint.keep_every={self.keep_every} is not a multiple of "
                f"checkpoint.every_steps={self.every_steps}, so no saved step would ever be kept "
                f"by it; use a multiple of {self.every_steps} or 0 to turn it off.")
        if self.resume_from not in (None, "") and not self.resume:
            raise UserError(f"checkpoint.resume_from={self.resume_from} is set but "
                            "checkpoint.resume is false; set resume: true to resume from it, or "
                            "drop resume_from to start afresh.")
        if isinstance(self.resume_from, int) and self.resume_from < 0:
            raise UserError(f"checkpoint.resume_from={self.resume_from} is negative; give a "
                            "step number, a checkpoint URI, or null for the newest one.")
        if self.uri is not None and not str(self.uri).strip():
            raise UserError("checkpoint.uri is an empty string; give a folder or fsspec URI "
                            "(e.g. gs://bucket/run) or null to disable checkpoints.")
