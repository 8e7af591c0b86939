"""`pretrain run CONFIG [key=value ...] [--tag k=v ...] [--json]`: the main job.

Starts an embedded local Ray on 127.0.0.1 (or joins RAY_ADDRESS), prepares the synthetic
demo data if the config asks for it and it is missing, trains with DeepSpeed on Ray Train
workers, logs to MLflow, and ends with a summary. With committed checkpoints under
checkpoint.uri it resumes from the newest (same MLflow run; another worker count or ZeRO
stage is resharded automatically). SIGTERM stops it at the next step with a final
checkpoint (exit 0, summary "stopped": true). Progress lines go to stderr; the summary
to stdout (with --json: one JSON object on the last stdout line).

The console shows what our code says (progress, evaluations, notes, warnings, errors, the
summary); everything the run's processes print, Ray's and the libraries' output included,
goes to a log file in the run's folder, which the summary names (`log_path`;
orchestration/console.py says how lines are told apart). `--verbose` shows it all.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HELP = "train a config on Ray + DeepSpeed (embedded local Ray, or RAY_ADDRESS), tracked in MLflow"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="experiment config YAML (e.g. configs/smoke.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.steps=100 train.zero_stage=3")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                        help="MLflow run tag (repeatable), e.g. --tag team=vision")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on the last stdout line")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, the workers' and the libraries' own output on the "
                             "console (it is always in the run's log file)")


def run(args) -> int:
    from orchestration.console import Console

    # Ray folds repeated worker lines into one "[repeated Nx]": the log keeps them all.
    if not args.verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with Console(verbose=args.verbose) as console:
        return _run(args, console)


def _run(args, console) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not os.environ.get("RAY_ADDRESS"):
        from orchestration.driver import LOOPBACK_ONLY_ENV

        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")   # the local Ray: loopback only
    from pretrain import process_env
    from pretrain.train.config import load_config

    from orchestration.tags import parse_tags

    tags = parse_tags(args.tags)
    cfg = absolute_paths(load_config(args.config, args.overrides))
    process_env.apply(process_env.config_env(cfg.resources))
    if cfg.tracking.enabled:
        # Checked before the data is prepared: an unreachable MLflow fails in seconds, with
        # nothing prepared or trained (the driver uses the URI this settles on).
        from pretrain.train.tracking import usable_tracking_uri

        cfg.tracking.tracking_uri = usable_tracking_uri(cfg.tracking)
    from orchestration.driver import check_lease

    check_lease(cfg)   # another live job on checkpoint.uri: refused before anything starts
    # The MLflow run's name unless tracking.run_name says otherwise: a job's config carries its
    # job name (orchestration/ray_jobs.job_config); a local run is its config's stem + time.
    name = f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    log = console.open_log(log_path(cfg, args.config, name))
    print(f"log: {log}" + ("" if args.verbose else " (Ray's, the workers' and the libraries' "
                                                   "output; --verbose shows it here)"),
          file=sys.stderr, flush=True)
    data_info = ensure_data(cfg)

    from orchestration.driver import run_job

    t0 = time.monotonic()

    def on_progress(item: dict) -> None:
        step = item.get("step")
        if "train/loss" in item:
            done = max(step, 1)
            elapsed = time.monotonic() - t0
            eta = elapsed / done * (cfg.train.steps - step)
            print(f"step {step}/{cfg.train.steps}  loss {item['train/loss']:.4f}  "
                  f"{item['perf/samples_per_sec']:.1f} samples/s  eta {_fmt(eta)}",
                  file=sys.stderr, flush=True)
        else:
            figures = "  ".join(f"{k} {v:.4f}" for k, v in item.items() if k != "step")
            print(f"step {step}/{cfg.train.steps}  {figures}", file=sys.stderr, flush=True)

    summary = run_job(cfg, config_name=name, on_progress=on_progress, data_info=data_info,
                      tags=tags, on_console=None if args.verbose else console.show)
    summary["wall_s"] = time.monotonic() - t0
    summary["log"] = log
    _print_summary(summary, cfg)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


def log_path(cfg, config: str, name: str) -> str:
    """The run's log file: `logs/NAME.log` in the run's folder, which is the folder holding
    a local checkpoint.uri (runs/smoke for runs/smoke/checkpoints), else runs/CONFIG_STEM
    under the working directory (checkpoints in a bucket, or none)."""
    from pretrain import storage

    uri = cfg.checkpoint.uri
    if uri and not storage.is_remote(uri):
        folder = os.path.dirname(os.path.abspath(storage.local_path(uri)).rstrip(os.sep))
    else:
        folder = os.path.abspath(os.path.join("runs", Path(config).stem))
    return os.path.join(folder, "logs", f"{name}.log")


def ensure_data(cfg):
    """Check the dataset URIs before Ray starts; write the synthetic demo data first when
    the config asks for it and it is missing. Returns their metadata (a DataInfo), read once
    for the driver's checks."""
    from pretrain.data.metadata import ensure_datasets

    return ensure_datasets(cfg.data, prepare=True)


def absolute_paths(cfg):
    """The config with its relative local paths made absolute (pretrain.storage.absolute):
    Ray workers need not share the driver's working directory."""
    from pretrain import storage
    from pretrain.train.config import ExperimentConfig, from_dict, to_dict

    tree = to_dict(cfg)
    storage.refuse_credentials_in_tree(tree)   # see pretrain/storage.py: never recorded
    return from_dict(ExperimentConfig, storage.absolute_locations(tree))


def _print_summary(s: dict, cfg) -> None:
    m = s.get("metrics", {})
    what = "stopped early after step" if s.get("stopped") else "finished"
    lines = [f"{what} {s.get('steps')}/{cfg.train.steps} steps on {s.get('world_size')} workers "
             f"in {_fmt(s.get('wall_s', 0))}"
             + (f" (resumed from step {s['resumed_from_step']})" if s.get("resumed_from_step") else "")]
    for key in ("train/loss", "eval/video_top1", "eval/image_top1", "perf/samples_per_sec",
                "perf/tokens_per_sec", "perf/step_time_s", "perf/mfu", "data/skipped_samples"):
        if key in m:
            lines.append(f"  {key:24s} {m[key]:.4g}")
    if s.get("mlflow_run_id"):
        lines.append(f"  mlflow run {s['mlflow_run_id']} at {s['tracking_uri']} "
                     f"(mlflow ui --backend-store-uri {s['tracking_uri']})")
    lines.append(f"  checkpoint {s.get('checkpoint') or 'none'}")
    if s.get("log"):
        lines.append(f"  log {s['log']}")
    print("\n".join(lines), flush=True)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
