"""`pretrain submit | status | logs | stop | list`: training jobs on a Ray cluster.

    pretrain submit configs/smoke.yaml train.steps=50 --name smoke-a [--tag team=vision] [--json]
    pretrain status smoke-a [--json]        # by name (newest attempt) or submission id
    pretrain logs smoke-a [--follow]
    pretrain stop smoke-a                   # SIGTERM: final checkpoint, then STOPPED
    pretrain submit configs/smoke.yaml --name smoke-a   # resumes from its checkpoints
    pretrain list [--tag team=vision] [--status RUNNING] [--json]

The cluster address comes from --address, else RAY_ADDRESS, else --profile's address, else
http://127.0.0.1:8265. See orchestration/ray_jobs.py for names, attempts and resume.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _add_arguments(verb: str, parser) -> None:
    if verb == "submit":
        parser.add_argument("config", help="experiment config YAML (e.g. configs/smoke.yaml)")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="config overrides, e.g. train.steps=100")
        parser.add_argument("--name", help="job name; resubmitting a name resumes it from its "
                            "checkpoints (default: config name + random suffix)")
        parser.add_argument("--tag", dest="tags", action="append", default=[],
                            metavar="KEY=VALUE", help="tag the job (repeatable): kept in its "
                            "Ray metadata and set on its MLflow run; `pretrain list --tag` "
                            "filters on it")
    elif verb == "list":
        parser.add_argument("--tag", dest="tags", action="append", default=[],
                            metavar="KEY=VALUE", help="only jobs with this tag (repeatable: "
                            "all of them)")
        parser.add_argument("--status", choices=ray_jobs_statuses(), type=str.upper,
                            help="only jobs in this state")
    elif verb in ("status", "logs", "stop"):
        parser.add_argument("job", metavar="JOB", help="submission id, or a job name (its "
                            "newest attempt)")
    if verb == "logs":
        parser.add_argument("--follow", "-f", action="store_true",
                            help="stream the output until the job ends")
    if verb == "stop":
        parser.add_argument("--no-wait", action="store_true",
                            help="return right after asking; do not wait for the job to end")
    parser.add_argument("--address", help="Ray dashboard / Jobs API URL (default: RAY_ADDRESS, "
                        "the profile's address, else http://127.0.0.1:8265)")
    parser.add_argument("--profile", help="cluster profile giving the address and auth mode "
                        "(see `pretrain cluster list`)")
    if verb != "logs":
        parser.add_argument("--json", action="store_true",
                            help="print one JSON object on the last stdout line")


def ray_jobs_statuses() -> tuple[str, ...]:
    return ("PENDING", "RUNNING") + TERMINAL


def _connect(args, profile=None):
    from orchestration.ray_jobs import JobsClient, resolve_address

    if profile is None and args.profile:
        from cluster.profiles import load_profile

        profile = load_profile(args.profile)
    address = resolve_address(args.address, profile)
    return JobsClient(address, auth_mode=(profile or {}).get("auth"))


def _submit(args) -> int:
    import yaml

    from orchestration import ray_jobs
    from pretrain.train.config import load_config

    from orchestration.tags import parse_tags, to_metadata

    profile = None
    if args.profile:
        from cluster.profiles import load_profile

        profile = load_profile(args.profile)
    from cluster.profiles import config_overrides

    # a bad config stops here, before any network; the profile's keys (spot: max_preemptions)
    # go first, the job's own overrides win
    cfg = load_config(args.config, [*config_overrides(profile), *args.overrides])
    tags = parse_tags(args.tags)
    name = ray_jobs.check_name(args.name) if args.name else ray_jobs.default_name(args.config)
    address = ray_jobs.resolve_address(args.address, profile)
    loopback = ray_jobs.is_loopback(address)

    raw = ray_jobs.job_config(cfg, name, local_cwd=Path.cwd() if loopback else None,
                          where=f"the cluster at {address}")
    runtime_env = ray_jobs.job_runtime_env(
        yaml.safe_dump(raw, sort_keys=False), name=name, use_gpu=cfg.resources.use_gpu,
        grace_s=cfg.checkpoint.preempt_grace_s, cwd=Path.cwd() if loopback else None,
        extra_env=(profile or {}).get("job", {}).get("env", {}),
        pass_env=ray_jobs.LOOPBACK_PASS_ENV if loopback else ray_jobs.PASS_ENV, tags=tags)
    checkpoint_uri = raw["checkpoint"]["uri"]
    client = ray_jobs.JobsClient(address, auth_mode=(profile or {}).get("auth"))
    resume = ray_jobs.latest_checkpoint(checkpoint_uri) if cfg.checkpoint.resume else None
    job_id = client.submit(
        name=name, entrypoint=ray_jobs.ENTRYPOINT, runtime_env=runtime_env,
        metadata={ray_jobs.META_CONFIG: str(args.config),
                  ray_jobs.META_CHECKPOINT: checkpoint_uri or "", **to_metadata(tags)})
    out = {"job_id": job_id, "name": name, "address": address, "checkpoint_uri": checkpoint_uri,
           "resumes_from_step": resume["step"] if resume else None, "tags": tags}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"submitted {job_id} to {address}")
        if checkpoint_uri:
            where = (f"resumes from step {resume['step']}" if resume
                     else "starts fresh (no committed checkpoint yet)")
            print(f"  checkpoints {checkpoint_uri} ({where})")
        else:
            print("  checkpoints off (checkpoint.uri is null): this job cannot be resumed")
        print(f"  pretrain status {name}    pretrain logs {name} --follow    "
              f"pretrain stop {name}")
    return 0


def job_status(client, job: str) -> dict:
    """Everything `status` reports, as a dict (also used by `stop`)."""
    from orchestration import ray_jobs

    record = client.resolve(job)
    # The last lines hold the newest progress line and the summary; never the whole log.
    tail = client.logs_tail(record.submission_id)
    progress = ray_jobs.progress_from_logs(tail)
    checkpoint = ray_jobs.latest_checkpoint(record.checkpoint_uri)
    summary = progress.get("summary") or {}
    out = {
        "job_id": record.submission_id, "name": record.name, "attempt": record.attempt,
        "status": record.status, "step": progress.get("step"), "steps": progress.get("steps"),
        "loss": progress.get("loss"),
        "checkpoint": (checkpoint or {}).get("uri") or summary.get("checkpoint"),
        "checkpoint_step": (checkpoint or {}).get("step"),
        "checkpoint_uri": record.checkpoint_uri,
        "mlflow_run_id": progress.get("mlflow_run_id") or (checkpoint or {}).get("mlflow_run_id"),
        "tracking_uri": summary.get("tracking_uri"),
        "metrics": summary.get("metrics"),
        "message": record.message, "start_time": record.start_time,
        "end_time": record.end_time, "tags": record.tags,
        **interruptions(tail, summary),
    }
    return out


_RESTART_RE = re.compile(r"^worker group restart (\d+):", re.M)
_NOTICE_RE = re.compile(r"^preemption notice (\d+):", re.M)


def interruptions(tail: str, summary: dict) -> dict:
    """Restarts of the worker group and node-drain notices so far: the summary's counts
    once the run is over, else the newest numbered driver lines in the log's tail (None
    when the tail holds none: older lines are not read)."""
    out = {}
    for key, pattern in (("restarts", _RESTART_RE), ("preemptions", _NOTICE_RE)):
        if summary.get(key) is not None:
            out[key] = summary[key]
        else:
            found = pattern.findall(tail)
            out[key] = int(found[-1]) if found else None
    return out


def _status(args) -> int:
    st = job_status(_connect(args), args.job)
    if args.json:
        print(json.dumps(st, default=str))
        return 0
    step = f"{st['step']}/{st['steps']}" if st["steps"] else (st["step"] or "-")
    print(f"{st['job_id']}  {st['status']}  step {step}"
          + (f"  loss {st['loss']:.4f}" if st["loss"] is not None else ""))
    if st["name"]:
        print(f"  name        {st['name']} (attempt {st['attempt']})")
    if st["tags"]:
        print(f"  tags        {_fmt_tags(st['tags'])}")
    print(f"  checkpoint  {st['checkpoint'] or 'none committed yet'}")
    if st.get("restarts") or st.get("preemptions"):
        print(f"  restarts    {st['restarts'] or 0} (preemption notices {st['preemptions'] or 0})")
    if st["mlflow_run_id"]:
        print(f"  mlflow run  {st['mlflow_run_id']}"
              + (f" at {st['tracking_uri']}" if st["tracking_uri"] else ""))
    if st["status"] == "FAILED" and st["message"]:
        print(f"  message     {st['message'].strip().splitlines()[0]}")
    return 0


def _logs(args) -> int:
    client = _connect(args)
    if not args.follow:
        sys.stdout.write(client.logs(args.job))
        return 0
    for chunk in client.follow(args.job):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def _stop(args) -> int:
    from orchestration import ray_jobs

    client = _connect(args)
    record = client.stop(args.job)
    status = record.status
    if not args.no_wait and status in ray_jobs.ACTIVE:
        # Ray gives the run RAY_JOB_STOP_WAIT_TIME_S (its grace + margin) before SIGKILL.
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            status = client.resolve(record.submission_id).status
            if status in TERMINAL:
                break
            time.sleep(1.0)
    st = job_status(client, record.submission_id) if status in TERMINAL else {
        "job_id": record.submission_id, "status": status, "checkpoint": None}
    if args.json:
        print(json.dumps({"job_id": st["job_id"], "status": st["status"],
                          "checkpoint": st["checkpoint"], "step": st.get("step")}))
    else:
        print(f"{st['job_id']}  {st['status']}"
              + (f"  last checkpoint {st['checkpoint']}" if st.get("checkpoint") else ""))
    return 0


def _list(args) -> int:
    from orchestration.tags import matches, parse_tags

    wanted = parse_tags(args.tags)
    records = [r for r in _connect(args).list()
               if matches(r.tags, wanted) and (not args.status or r.status == args.status)]
    if args.json:
        print(json.dumps({"jobs": [r.to_dict() for r in records]}, default=str))
        return 0
    if not records:
        print("no jobs" + (" matching" if wanted or args.status else ""))
        return 0
    print(f"{'JOB':32s} {'STATUS':10s} {'NAME':24s} {'STARTED':19s} TAGS")
    for r in records:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.start_time)) \
            if r.start_time else "-"
        print(f"{r.submission_id:32s} {r.status:10s} {r.name or '-':24s} {started:19s} "
              f"{_fmt_tags(r.tags)}")
    return 0


def _fmt_tags(tags: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(tags.items()))


# The verbs this module serves (orchestration/cli.py VERBS), each with the verb protocol's
# HELP, add_arguments and run.
def _verb(name: str, help: str, run) -> SimpleNamespace:
    return SimpleNamespace(HELP=help, add_arguments=lambda parser: _add_arguments(name, parser),
                           run=run)


SUBMIT = _verb("submit", "submit a training config as a Ray job (validated here first)", _submit)
STATUS = _verb("status", "a job's state, step, latest checkpoint and MLflow run", _status)
LOGS = _verb("logs", "a job's output (--follow to stream it until the job ends)", _logs)
STOP = _verb("stop", "stop a job gracefully (it writes a final checkpoint first)", _stop)
LIST = _verb("list", "jobs on the Ray cluster", _list)
