"""`pretrain cluster list | render`: cluster profiles and the manifests they make.

    pretrain cluster list [--json]
    pretrain cluster render gke-8xh100 --config configs/tubevit-b.yaml --workers 16 --out k8s/
    pretrain cluster render gcp-vm-8xa100 --config configs/tubevit-l.yaml --workers 32 --out vm/
    pretrain cluster render local --config configs/smoke.yaml checkpoint.uri=gs://b/smoke \
        --workers 2 --out kind/

Kubernetes profiles write `raycluster.yaml` (a cluster for `pretrain submit`) and
`rayjob.yaml` (the job with its own cluster); gcp-vm profiles write `cluster.yaml` for
`ray up`. Every file is validated (KubeRay CRDs, Ray's launcher schema) before it is written,
and sized from the job's ScalingConfig (workers, CPUs and GPUs per worker). With
`--decode-cores-per-accelerator N` (from `pretrain plan --accelerator ... --decode-rate R`)
render warns when the profile's worker nodes have fewer CPUs per GPU than decoding needs.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

HELP = "cluster profiles: list them, render KubeRay / Ray launcher manifests for a job"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="cluster_verb", metavar="{list,render}")
    sub.required = True
    ls = sub.add_parser("list", help="the packaged cluster profiles",
                        description="the packaged cluster profiles")
    ls.add_argument("--json", action="store_true", help="one JSON object on the last line")
    r = sub.add_parser("render", help="write validated manifests for a config on a profile",
                       description="write validated manifests for a config on a profile")
    r.add_argument("profile", help="profile name (see `pretrain cluster list`) or a YAML file")
    r.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "key=value"),
                   help="experiment config YAML, then config overrides (train.steps=10 ...)")
    r.add_argument("--workers", type=int, required=True, help="training workers (resources.workers)")
    r.add_argument("--out", required=True, help="folder to write the manifests into")
    r.add_argument("--name", help="job / cluster name (default: the config's name)")
    r.add_argument("--set", dest="profile_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="profile override, e.g. worker.max_nodes=4")
    r.add_argument("--decode-cores-per-accelerator", type=float, metavar="N",
                   help="CPU cores one accelerator needs to decode its clips (decode_cores_per_"
                        "accelerator of `pretrain plan --accelerator ... --decode-rate R`); warns "
                        "when the profile's worker nodes have fewer CPUs per GPU")
    r.add_argument("--json", action="store_true", help="one JSON object on the last line")


def run(args) -> int:
    return _list(args) if args.cluster_verb == "list" else _render(args)


def _list(args) -> int:
    from cluster.profiles import load_profile, profile_names

    rows = []
    for name in profile_names():
        p = load_profile(name)
        w = p["worker"]
        rows.append({"name": name, "platform": p["platform"], "description": p["description"],
                     "address": p["address"], "worker_cpus": w["cpus"], "worker_gpus": w["gpus"],
                     "worker_memory": w["memory"], "accelerator": w["accelerator"]
                     or p["gcp"]["accelerator_type"], "max_nodes": w["max_nodes"]})
    if args.json:
        print(json.dumps({"profiles": rows}))
        return 0
    print(f"{'PROFILE':16s} {'PLATFORM':11s} {'WORKER NODE':34s} {'MAX':>4s}  DESCRIPTION")
    for r in rows:
        node = f"{r['worker_gpus']} GPU, {r['worker_cpus']} CPU, {r['worker_memory']}"
        print(f"{r['name']:16s} {r['platform']:11s} {node:34s} {r['max_nodes']:>4d}  "
              f"{r['description']}")
    return 0


def render_job(profile_name: str, config: str, workers: int, *, name: str | None = None,
               overrides: list[str] = (), profile_overrides: list[str] = ()) -> dict[str, dict]:
    """{file name: manifest} for a config on a profile, each validated."""
    import yaml

    from cluster import render, validate
    from cluster.profiles import config_overrides, load_profile
    from orchestration import ray_jobs
    from pretrain.train.config import load_config

    profile = load_profile(profile_name, list(profile_overrides))
    cfg = load_config(config, [*config_overrides(profile), *overrides,
                               f"resources.workers={workers}"])
    r = cfg.resources
    shape = render.JobShape(workers=r.workers, use_gpu=r.use_gpu,
                            cpus_per_worker=r.cpus_per_worker,
                            gpus_per_worker=1 if r.use_gpu else 0)
    placement = render.place(profile, shape)
    name = ray_jobs.check_name(name) if name else render.k8s_name(Path(config).stem)
    what = f"profile '{profile['name']}'"
    grace = int(cfg.checkpoint.preempt_grace_s) + ray_jobs.STOP_MARGIN_S
    if profile["platform"] == "gcp-vm":
        launcher = render.render_launcher(profile, placement, name)
        validate.check_launcher(launcher, what)
        return {"cluster.yaml": launcher}
    raw = ray_jobs.job_config(cfg, name, local_cwd=None, where=f"cluster profile '{profile['name']}'")
    runtime_env = ray_jobs.job_runtime_env(
        yaml.safe_dump(raw, sort_keys=False), name=name, use_gpu=r.use_gpu,
        grace_s=cfg.checkpoint.preempt_grace_s, working_dir=None,
        extra_env=profile["job"]["env"])
    metadata = {ray_jobs.META_NAME: name, ray_jobs.META_ATTEMPT: "1", ray_jobs.META_CONFIG: str(config),
                ray_jobs.META_CHECKPOINT: raw["checkpoint"]["uri"] or ""}
    cluster = render.render_raycluster(profile, placement, name, grace)
    job = render.render_rayjob(profile, placement, name, grace, entrypoint=ray_jobs.ENTRYPOINT,
                               runtime_env=runtime_env, metadata=metadata)
    validate.check_manifest(cluster, what)
    validate.check_manifest(job, what)
    if render.exposure_warning(profile):   # no auth: the RayJob would need an open dashboard
        return {"raycluster.yaml": cluster}
    return {"raycluster.yaml": cluster, "rayjob.yaml": job}


def _render(args) -> int:
    from cluster import render
    from pretrain.errors import UserError

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    need = args.decode_cores_per_accelerator
    if need is not None and need <= 0:
        raise UserError(f"--decode-cores-per-accelerator must be > 0, got {need:g}")
    config, *overrides = args.config
    files = render_job(args.profile, config, args.workers, name=args.name,
                       overrides=overrides, profile_overrides=args.profile_overrides)
    from cluster.profiles import load_profile

    profile = load_profile(args.profile, args.profile_overrides)
    warnings = [render.exposure_warning(profile)]
    if need is not None:
        warnings.append(render.decode_cores_warning(profile, need))
    for warning in filter(None, warnings):
        print(textwrap.fill(warning, width=100, subsequent_indent="  "), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, manifest in files.items():
        path = out / fname
        path.write_text(render.dump_yaml(manifest))
        written.append(str(path))
    if args.json:
        print(json.dumps({"files": written}))
    else:
        for path in written:
            print(f"wrote {path}")
    return 0
