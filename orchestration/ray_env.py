"""The runtime_env Ray gives the processes it starts for us: training workers (driver.py) and
submitted jobs (ray_jobs.py).

Its env_vars are the training process's environment (pretrain/process_env.py: accelerator,
threads), the variables of this process that the remote side needs as well (`pass_env`),
and what the caller adds; with a working_dir the project's code travels along.
"""
from __future__ import annotations

import os
from pathlib import Path

# Passed from the driver to its workers: where MLflow and the GCS emulator are, and the
# import path of a checkout that is not installed.
WORKER_PASS_ENV = ("MLFLOW_TRACKING_URI", "STORAGE_EMULATOR_HOST", "PYTHONPATH")


def runtime_env(process: dict[str, str], *, pass_env: tuple[str, ...] = (),
                env: dict[str, str] | None = None, working_dir: Path | None = None,
                excludes: list[str] | None = None) -> dict:
    """A Ray runtime_env: env_vars = `process` + the `pass_env` variables set here + `env`
    (later ones win); `working_dir` (with `excludes`) when the code must be uploaded."""
    env_vars = dict(process)
    env_vars.update({k: os.environ[k] for k in pass_env if os.environ.get(k)})
    env_vars.update({k: str(v) for k, v in (env or {}).items()})
    out: dict = {"env_vars": env_vars}
    if working_dir is not None:
        out["working_dir"] = str(working_dir)
        out["excludes"] = list(excludes or [])
    return out
