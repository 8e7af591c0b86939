"""What a prepared dataset folder holds, and reading its description.

A dataset folder (local path or fsspec URI) written by `pretrain prepare` contains:

    index.json              MDS index (mosaicml-streaming); written last, so its presence
                            means the folder is complete
    shard.NNNNN.mds         MDS shards: encoded media bytes + label + sampling metadata
    labels.json             {"modality", "dataset", "labels": [class names, index order],
                             "num_samples", "hflip_ok", ...}: the label map heads are sized by;
                             "unlabelled": N when N samples carry no label (key absent: none)
    prepare_report.json     which inputs were written or skipped, and why; the folders read
    part-NNNNN/             `prepare --ray` only: one folder per manifest chunk (its own
                             index.json, shards and report); the top index.json lists their
                             shards (basenames part-NNNNN/shard.NNNNN.mds)

Video samples store the encoded file bytes, not decoded frames, with what clip sampling
needs (fps, frame count, size, duration). Image samples store the encoded image bytes.
A sample's label is its class's index in labels.json's "labels", or UNLABELLED (-1) for an
input prepared without a label (masked pretraining needs none; a supervised run refuses a
dataset with such samples, see `dataset_info`'s "labelled").
"""
from __future__ import annotations

import json

from pretrain import storage
from pretrain.errors import UserError

FORMAT = "tubevit-shards/1"
INDEX = "index.json"
LABELS = "labels.json"
REPORT = "prepare_report.json"

VIDEO_COLUMNS = {
    "video": "bytes", "label": "int", "key": "str", "fps": "float64", "num_frames": "int",
    "width": "int", "height": "int", "duration": "float64",
}
# Video re-encoded by prepare (pretrain.data.transcode) also records the frame rate of the
# original, which data.frame_stride counts in (datasets of original bytes need not).
SOURCE_FPS_COLUMNS = {"source_fps": "float64"}
IMAGE_COLUMNS = {"image": "bytes", "label": "int", "key": "str", "width": "int", "height": "int"}
UNLABELLED = -1   # the label of a sample prepared without one


def label_doc(modality: str, dataset: str, labels: list[str], num_samples: int,
              hflip_ok: bool = True, **extra) -> dict:
    return {"format": FORMAT, "modality": modality, "dataset": dataset, "labels": list(labels),
            "num_classes": len(labels), "num_samples": int(num_samples), "hflip_ok": hflip_ok,
            **extra}


def dataset_info(uri: str) -> dict:
    """Describe a prepared dataset: num_classes, labels, num_samples, modality, dataset,
    hflip_ok, num_unlabelled (samples stored as UNLABELLED) and labelled (every sample has a
    label: what a supervised run needs).

    Raises UserError naming the URI when it is missing, incomplete or not a prepared dataset.
    """
    index_uri, labels_uri = storage.join(uri, INDEX), storage.join(uri, LABELS)
    try:
        has_index = storage.exists(index_uri)
        has_labels = storage.exists(labels_uri)
    except UserError:
        raise
    except Exception as exc:  # credentials, network, permissions
        raise UserError(f"dataset URI '{uri}' cannot be read ({exc.__class__.__name__}: {exc}); "
                        "check the path, the bucket name and storage credentials") from None
    if not has_index or not has_labels:
        missing = INDEX if not has_index else LABELS
        raise UserError(f"dataset URI '{uri}' has no {missing}; it must be a folder written by "
                        "`pretrain prepare video|image|synthetic` (which writes index.json last, "
                        "so an interrupted prepare leaves none)")
    try:
        doc = json.loads(storage.read_bytes(labels_uri))
        index = json.loads(storage.read_bytes(index_uri))
    except Exception as exc:
        raise UserError(f"dataset URI '{uri}': {LABELS} or {INDEX} is unreadable "
                        f"({exc.__class__.__name__}: {exc}); re-run `pretrain prepare`") from None
    if doc.get("modality") not in ("video", "image") or not isinstance(doc.get("labels"), list):
        raise UserError(f"dataset URI '{uri}': {LABELS} does not describe a video or image "
                        "dataset; re-run `pretrain prepare`")
    num_samples = sum(int(s.get("samples", 0)) for s in index.get("shards", []))
    unlabelled = int(doc.get("unlabelled", 0))
    return {
        "num_classes": len(doc["labels"]),
        "labels": doc["labels"],
        "num_samples": num_samples,
        "modality": doc["modality"],
        "dataset": doc.get("dataset") or doc["modality"],
        "hflip_ok": bool(doc.get("hflip_ok", True)),
        "num_unlabelled": unlabelled,
        "labelled": unlabelled == 0 and bool(doc["labels"]),
    }


def read_labels(uri: str) -> list[str]:
    """Class names from a labels.json file or a dataset folder holding one."""
    target = uri if uri.endswith(".json") else storage.join(uri, LABELS)
    try:
        doc = json.loads(storage.read_bytes(target))
    except FileNotFoundError:
        raise UserError(f"label map '{target}' does not exist; pass a labels.json written by "
                        "`pretrain prepare` or the dataset folder holding it") from None
    labels = doc.get("labels") if isinstance(doc, dict) else doc
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise UserError(f"label map '{target}' holds no list of class names under 'labels'")
    return labels
