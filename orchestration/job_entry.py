"""The entrypoint of a job sent by `pretrain submit` or rendered into a KubeRay RayJob.

    python -m orchestration.job_entry

It writes the config that the submitter resolved and validated (PRETRAIN_JOB_CONFIG, YAML)
to a file named after the job and runs `pretrain run FILE --json --verbose` on it in this
process (so the job log, which `pretrain logs` shows, keeps the workers' and Ray's output
too); the job's last log line is the run's JSON summary. On a loopback cluster it first
changes to the directory the job was submitted from (PRETRAIN_JOB_CWD), where a local
`pretrain run` would have run.

Stopping: `pretrain stop` makes Ray send SIGTERM to this process; `pretrain run` handles it
(final checkpoint, then exit) within checkpoint.preempt_grace_s, before Ray's SIGKILL.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from orchestration.ray_jobs import CONFIG_ENV, CWD_ENV, NAME_ENV, TAGS_ENV


def main() -> int:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(f"error: {CONFIG_ENV} is not set; this entrypoint runs jobs sent by "
              "`pretrain submit` or rendered by `pretrain cluster render`.", file=sys.stderr)
        return 2
    name = os.environ.get(NAME_ENV) or "job"
    # The code is the job's working_dir (or the image); keep it importable after a chdir.
    sys.path.insert(0, os.getcwd())
    cwd = os.environ.get(CWD_ENV)
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    path = Path(tempfile.mkdtemp(prefix="pretrain-job-")) / f"{name}.yaml"
    path.write_text(text)
    print(f"pretrain job {name}: config {path}", flush=True)

    from orchestration.cli import main as cli
    from orchestration.tags import as_args

    tags = json.loads(os.environ.get(TAGS_ENV) or "{}")   # `pretrain submit --tag`
    # --verbose: the job's log (`pretrain logs`) is where an operator reads a job's whole
    # output, Ray's and the workers' included, as before the quiet console.
    return cli(["run", str(path), "--json", "--verbose", *as_args(tags)])


if __name__ == "__main__":
    from orchestration.cli import exit_now

    exit_now(main())   # the job counts as finished seconds sooner (exit_now says why)
