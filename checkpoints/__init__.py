"""Sharded checkpoints in object storage: save, async upload, commit, discover, retain,
resume (with resharding through DeepSpeed's universal format) and export.

Imports here stay light (no torch/DeepSpeed at import time of the package itself).
"""
from checkpoints.config import CheckpointConfig
from checkpoints.discovery import CheckpointInfo, latest_committed, list_checkpoints, resolve

__all__ = ["CheckpointConfig", "CheckpointInfo", "latest_committed", "list_checkpoints", "resolve"]
