"""Data: prepared MDS shards, clip decoding, joint image+video streaming that resumes exactly.

Public API (imported lazily so `pretrain --help` stays fast):
    DataConfig, SyntheticConfig            config section `data`
    JointLoader, EvalLoader, Batch         training / eval loaders
    ensure_datasets(cfg, prepare=True)     check URIs (UserError), make synthetic data if asked
    dataset_info(uri)                      num_classes, labels, num_samples, modality, dataset
    prepare_synthetic(out_uri, videos, images, seed=0, ...)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "pretrain.data.config", "SyntheticConfig": "pretrain.data.config",
    "JointLoader": "pretrain.data.loader", "EvalLoader": "pretrain.data.loader",
    "Batch": "pretrain.data.loader", "ensure_datasets": "pretrain.data.loader",
    "dataset_info": "pretrain.data.shards", "prepare_synthetic": "pretrain.data.synthetic",
    "prepare": "pretrain.data.prepare",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pretrain.data' has no attribute '{name}'")
