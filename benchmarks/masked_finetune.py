"""Does masked pretraining help? smoke.yaml fine-tuned from smoke-masked.yaml's export vs
smoke.yaml from scratch, with the same fine-tuning step budget (issue 12 §8).

    python benchmarks/masked_finetune.py [--pretrain-steps N] [--finetune-steps 300] [--json]
        [--pretrain-set masked.scheme=random ...]

Three training runs, each `python -m pretrain.train.launch` with 2 CPU ranks (the standalone
path of the same trainer `pretrain run` drives through Ray; its store listens on 127.0.0.1
only, where torchrun's would listen on every interface):

1. configs/smoke-masked.yaml for --pretrain-steps (default: the config's train.steps;
   masked autoencoding, kNN monitor);
   its last checkpoint is exported (checkpoints.export) to a model file;
2. configs/smoke.yaml for --finetune-steps with model.init_from=<that file> (the encoder;
   the decoder is dropped, new heads) and train.layer_decay (--layer-decay, default 1.0: no
   decay; see main() for why not VideoMAE's 0.75);
3. configs/smoke.yaml for --finetune-steps from scratch (same seed, data, schedule), after 2.

Both fine-tuning runs evaluate once, at the end, on the held-out sets. `--json` prints one
JSON object: the masked run's kNN top-1 and held-out reconstruction loss at each of its
eval points (step -> value, from step 0) and its final training loss; held-out
eval/video_top1 and eval/image_top1 of both fine-tuning runs; wall seconds of each run;
and `ratio` = mean top-1 (video, image) fine-tuned from
the masked export / the same from scratch (higher = pretraining helps; 1 = no effect).
Runs write under --root (default runs/masked_finetune) and log to MLflow in its sqlite file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import print_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Training:
    """One standalone run (pretrain.train.launch, started at construction); `result()` waits
    for it and returns its summary (rank 0's last JSON stdout line) with its wall seconds."""

    def __init__(self, config: str, overrides: list[str], root: Path, name: str, workers: int):
        self.name, self.out, self.err = name, root / f"{name}.out", root / f"{name}.err"
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "pretrain.train.launch", "--nproc-per-node", str(workers),
               str(ROOT / "configs" / config), *overrides]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out.open("w"),
                                     stderr=self.err.open("w"))

    def result(self) -> dict:
        rc = self.proc.wait()
        if rc != 0:
            raise SystemExit(f"{self.name} failed (exit {rc}); see {self.err}")
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("{")]
        summary = json.loads(lines[-1])
        summary["wall_s"] = time.monotonic() - self.t0
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="masked steps (default: configs/smoke-masked.yaml's train.steps)")
    # 300 fine-tuning steps: smoke.yaml from scratch saturates by its own 600 (video 1.0,
    # image 0.93), where no initialisation can show a difference.
    parser.add_argument("--finetune-steps", type=int, default=300)
    # No layer-wise decay by default: VideoMAE's 0.75 assumes an encoder pretrained for
    # hundreds of epochs; after 800 steps the lower layers still have most to learn, and 0.75
    # (tokenizer at 0.32x the lr of a 3-block model) made the fine-tune worse than scratch
    # (ratio 0.77 against 1.09 at 1.0, same export; README "Masked pretraining").
    parser.add_argument("--layer-decay", type=float, default=1.0)
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the masked run only (repeatable), e.g. "
                             "masked.scheme=random")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", default="runs/masked_finetune")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from checkpoints.export import export_checkpoint
    from pretrain.data.metadata import ensure_datasets
    from pretrain.train.config import load_config

    os.chdir(ROOT)   # the configs' data and cache paths are relative to the repository
    root = (ROOT / args.root).resolve()
    shutil.rmtree(root, ignore_errors=True)   # a fresh pretraining, never a resumed one
    root.mkdir(parents=True)
    ensure_datasets(load_config(ROOT / "configs" / "smoke.yaml").data)   # the smoke data, once
    common = [f"resources.workers={args.workers}", "train.progress_every_s=60",
              f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"]

    if args.pretrain_steps is None:
        args.pretrain_steps = load_config(ROOT / "configs" / "smoke-masked.yaml").train.steps
    masked = Training("smoke-masked.yaml", [f"train.steps={args.pretrain_steps}",
                                            f"checkpoint.uri={root}/masked/ckpt",
                                            f"checkpoint.every_steps={args.pretrain_steps}",
                                            *common, *args.pretrain_set],
                      root, "masked", args.workers).result()
    model_file = str(root / "masked.safetensors")
    export_checkpoint(masked["checkpoint"], model_file)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    # The monitor at every eval point of the masked run (step -> value), step 0 included.
    curve = {k: {m.step: round(m.value, 4)
                 for m in client.get_metric_history(masked["mlflow_run_id"], f"eval/{k}")}
             for k in ("knn_video_top1", "knn_image_top1", "video_recon_loss")}

    finetune = [f"train.steps={args.finetune_steps}", "train.eval_every=0",
                "checkpoint.uri=null", *common]
    # One after the other: two runs starting together on the same shards race for the
    # streaming library's shared-memory prefix (FileExistsError '/003114_locals' in one, the
    # other hung at its eval). Another user's run starting at that moment can do the same:
    # the race is in the data layer, not here; run the benchmark again if it names it.
    tuned = Training("smoke.yaml", [*finetune, f"model.init_from={model_file}",
                                    f"train.layer_decay={args.layer_decay}"],
                     root, "finetuned", args.workers).result()
    scratch = Training("smoke.yaml", finetune, root, "scratch", args.workers).result()

    def top1(summary):
        return {k: summary["metrics"].get(f"eval/{k}_top1") for k in ("video", "image")}

    t, s = top1(tuned), top1(scratch)
    result = {
        "pretrain_steps": args.pretrain_steps, "pretrain_set": args.pretrain_set,
        "finetune_steps": args.finetune_steps,
        "layer_decay": args.layer_decay,
        **{f"masked_{k}": v for k, v in curve.items()},
        "masked_train_loss_end": masked["metrics"].get("train/loss"),
        "finetuned_video_top1": t["video"], "finetuned_image_top1": t["image"],
        "scratch_video_top1": s["video"], "scratch_image_top1": s["image"],
        "masked_wall_s": masked["wall_s"], "finetuned_wall_s": tuned["wall_s"],
        "scratch_wall_s": scratch["wall_s"],
        "ratio": ((t["video"] + t["image"]) / (s["video"] + s["image"])
                  if None not in (*t.values(), *s.values()) and (s["video"] + s["image"]) else None),
    }
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
