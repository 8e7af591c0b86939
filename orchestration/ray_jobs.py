"""Ray Jobs API client: submit, inspect, follow and stop training jobs on any Ray cluster.

A job is `pretrain run` on the cluster. `submit` validates the config here first, then sends
the project as the job's working_dir and the resolved config in the runtime env
(PRETRAIN_JOB_CONFIG; `orchestration/job_entry.py` writes it to a file and runs it), so the
job trains exactly what was checked.

Names and resume: a job has a name (`--name`, else the config's stem plus a random suffix).
Ray submission ids are unique per cluster, so each attempt is submitted as `NAME-N`
(N = 1, 2, ...), and the name is stored in the job's metadata. Checkpoints of a named job live
under `<checkpoint.uri>/<NAME>`: a later attempt with the same name (after a stop or a
failure) finds the committed checkpoints of the earlier ones and resumes from the newest.
Every verb accepts either a submission id or a name (= its newest attempt).

Auth: with RAY_AUTH_MODE=token (or a profile with `auth: token`), requests carry the token
from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own
order). The header is sent explicitly rather than left to Ray's client, which reads
RAY_AUTH_MODE once per process and caches it.

Errors an operator can act on (unreachable address, auth failure, unknown job) become
`UserError`s of one paragraph.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from orchestration import tags as job_tags
from orchestration.ray_env import runtime_env
from pretrain import storage
from pretrain.errors import UserError
from pretrain.process_env import process_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT = "python -m orchestration.job_entry"
CONFIG_ENV = "PRETRAIN_JOB_CONFIG"      # the resolved config, YAML
NAME_ENV = "PRETRAIN_JOB_NAME"
CWD_ENV = "PRETRAIN_JOB_CWD"            # loopback clusters: run where the user submitted from
AGENT_WAIT_S = 60                       # submit retries while a fresh head's job agent starts
STOP_MARGIN_S = 30                      # Ray's SIGKILL comes this long after the run's own grace

# What the job's working_dir upload leaves out (on top of .gitignore, which Ray honours):
# data, run outputs, caches and the 2 MB of vendored CRD schemas the job never reads.
UPLOAD_EXCLUDES = [".git", "data/", "runs/", "mlruns/", "mlflow.db", "checkpoints_local/",
                   "*.safetensors", "__pycache__/", ".venv/", "*.egg-info/", ".pytest_cache/",
                   "cluster/schemas/", "benchmarks/results/"]

# Variables of the submitting process a job gets too: where MLflow is; on a loopback cluster
# (this machine) also the GCS emulator, which a remote cluster could not reach.
PASS_ENV = ("MLFLOW_TRACKING_URI",)
LOOPBACK_PASS_ENV = PASS_ENV + ("STORAGE_EMULATOR_HOST",)

META_NAME, META_ATTEMPT, META_CONFIG, META_CHECKPOINT = (
    "pretrain_name", "pretrain_attempt", "pretrain_config", "pretrain_checkpoint_uri")
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STATUS_TAIL_LINES = 2000               # what `status` reads of a job's log (its last lines)
FOLLOW_GIVE_UP_S = 120                 # `logs --follow` stops after this long without a stream
TAGS_ENV = "PRETRAIN_JOB_TAGS"         # the job's tags (JSON), for its MLflow run
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,50}$")
_PROGRESS_RE = re.compile(r"^step (\d+)/(\d+)\s+(?:loss (\S+))?", re.MULTILINE)
_MLFLOW_RE = re.compile(r"mlflow run ([0-9a-f]{32})")


# ---------------------------------------------------------------------------------------
# Where and how to talk to the cluster


def resolve_address(flag: str | None, profile: dict | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the profile's, else local."""
    for candidate in (flag, os.environ.get("RAY_API_SERVER_ADDRESS"),
                      os.environ.get("RAY_ADDRESS"), (profile or {}).get("address")):
        if candidate:
            return normalize_address(candidate)
    return DEFAULT_ADDRESS


def normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise UserError(
            f"address '{address}' is a Ray Client address; the Jobs API is the dashboard's "
            "HTTP address, e.g. http://HEAD:8265.")
    if "://" not in address:
        address = "http://" + address
    storage.refuse_credentials(address, "the Ray Jobs API address")
    if not urlparse(address).hostname:
        raise UserError(f"address '{address}' has no host; give the Ray dashboard URL, e.g. "
                        "http://127.0.0.1:8265.")
    return address


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def auth_token(auth_mode: str | None = None) -> str | None:
    """The Ray auth token to send, or None when token auth is not asked for."""
    mode = os.environ.get("RAY_AUTH_MODE") or auth_mode
    if mode != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        token = Path(path).read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise UserError(
            f"RAY_AUTH_MODE is token but no token was found: RAY_AUTH_TOKEN is unset and "
            f"{path} is missing or empty. Copy the cluster's token there (on the head: "
            "`ray get-auth-token`), or set RAY_AUTH_TOKEN.")
    return token


@dataclass
class JobRecord:
    """What `status` and `list` report about one attempt."""

    submission_id: str
    status: str
    name: str | None
    attempt: int | None
    entrypoint: str
    message: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    checkpoint_uri: str | None
    config: str | None
    tags: dict[str, str]

    @classmethod
    def from_details(cls, d: Any) -> "JobRecord":
        meta = d.metadata or {}
        attempt = meta.get(META_ATTEMPT)
        return cls(
            submission_id=d.submission_id or d.job_id, status=str(d.status.value),
            name=meta.get(META_NAME), attempt=int(attempt) if attempt else None,
            entrypoint=d.entrypoint, message=d.message or "",
            start_time=d.start_time / 1000 if d.start_time else None,
            end_time=d.end_time / 1000 if d.end_time else None,
            checkpoint_uri=meta.get(META_CHECKPOINT) or None, config=meta.get(META_CONFIG),
            tags=job_tags.from_metadata(meta))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class JobsClient:
    """A Ray `JobSubmissionClient` with our names, auth and one-paragraph errors."""

    def __init__(self, address: str, auth_mode: str | None = None, connect_timeout: float = 5.0):
        self.address = normalize_address(address)
        self._reachable(connect_timeout)
        token = auth_token(auth_mode)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._headers = headers or {}
        from ray.job_submission import JobSubmissionClient

        with self._errors(), _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            # Ray's client lets RAY_ADDRESS override the address it is given; ours was
            # already resolved (flag > env > profile), so hide the variables while it starts.
            self._client = JobSubmissionClient(self.address, headers=headers)

    # -- errors ----------------------------------------------------------------------

    def _reachable(self, timeout: float) -> None:
        url = urlparse(self.address)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                pass
        except OSError as exc:
            raise UserError(self._unreachable(str(exc))) from None

    def _unreachable(self, why: str) -> str:
        return (f"cannot reach the Ray Jobs API at {self.address} ({why}). Check that the Ray "
                "head is running and that this is its dashboard address (port 8265 by default, "
                "not the GCS port 6379); on Kubernetes forward it first (kubectl port-forward "
                "svc/CLUSTER-head-svc 8265:8265). The address comes from --address, else "
                "RAY_ADDRESS, else the cluster profile (--profile).")

    @contextlib.contextmanager
    def _errors(self, job: str | None = None):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "rejected"
            raise UserError(
                f"the Ray cluster at {self.address} refused our credentials ({first}). It uses "
                "token authentication: set RAY_AUTH_MODE=token and put the cluster's token in "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (on the head, "
                "`ray get-auth-token` prints it).") from None
        except (ConnectionError, requests.exceptions.ConnectionError) as exc:
            raise UserError(self._unreachable(type(exc).__name__)) from None
        except RuntimeError as exc:
            if "Version check returned" in str(exc):
                # JobSubmissionClient's first request: something answers HTTP there, but it
                # is not a Ray dashboard (another web server, a proxy, the wrong port).
                raise UserError(
                    f"{self.address} answers HTTP but is not a Ray dashboard ({str(exc).strip()}: "
                    "it has no Ray Jobs API). Give the Ray head's dashboard address (port 8265 by "
                    "default) with --address, RAY_ADDRESS or the cluster profile.") from None
            if job is not None and ("404" in str(exc) or "does not exist" in str(exc)):
                raise UserError(self._unknown(job)) from None
            raise

    def _unknown(self, job: str) -> str:
        known = sorted(self._list_raw(), key=lambda r: r.start_time or 0, reverse=True)
        names = sorted({r.name for r in known if r.name})
        ids = [r.submission_id for r in known[:8]]
        return (f"no job '{job}' on the Ray cluster at {self.address}: it is neither a "
                "submission id nor the name of a submitted job. "
                + (f"Recent ids: {', '.join(ids)}; names: {', '.join(names) or 'none'}. "
                   if ids else "The cluster has no jobs yet. ")
                + "`pretrain list` shows them all.")

    # -- queries ---------------------------------------------------------------------

    def _list_raw(self) -> list[JobRecord]:
        with self._errors():
            return [JobRecord.from_details(d) for d in self._client.list_jobs()]

    def list(self) -> list[JobRecord]:
        """Every job on the cluster, oldest first."""
        return sorted(self._list_raw(), key=lambda r: (r.start_time or 0, r.submission_id))

    def attempts(self, name: str) -> list[JobRecord]:
        """The attempts of a named job, oldest first."""
        return sorted((r for r in self._list_raw() if r.name == name),
                      key=lambda r: (r.attempt or 0, r.start_time or 0))

    def resolve(self, job: str) -> JobRecord:
        """A submission id, or a job name meaning its newest attempt."""
        with self._errors():
            try:
                return JobRecord.from_details(self._client.get_job_info(job))
            except RuntimeError as exc:
                if "404" not in str(exc) and "does not exist" not in str(exc):
                    raise
        runs = self.attempts(job)
        if not runs:
            raise UserError(self._unknown(job))
        return runs[-1]

    def logs(self, job: str) -> str:
        record = self.resolve(job)
        with self._errors(job):
            return self._client.get_job_logs(record.submission_id)

    def logs_tail(self, job: str, lines: int = STATUS_TAIL_LINES) -> str:
        """The last `lines` lines of a job's output, read by the head from the end of its log
        file (the state API's log endpoint), not the whole log shipped here: logs of long
        runs reach gigabytes. Falls back to the whole log where the endpoint is missing."""
        import requests

        record = self.resolve(job)
        with self._errors(job):
            node = self._client.get_job_info(record.submission_id).driver_node_id
        if not node:   # not started yet: no log file anywhere
            return self.logs(record.submission_id)
        url = f"{self.address}/api/v0/logs/file"
        params = {"submission_id": record.submission_id, "node_id": node, "lines": str(lines)}
        try:
            r = requests.get(url, params=params, headers=self._headers, timeout=60)
        except requests.exceptions.RequestException as exc:
            raise UserError(self._unreachable(type(exc).__name__)) from None
        if r.status_code == 200:
            return r.content.decode("utf-8", errors="replace")
        return self.logs(record.submission_id)   # e.g. a job without a log file yet

    def follow(self, job: str, reconnect_wait_s: float = 1.0,
               give_up_after_s: float = FOLLOW_GIVE_UP_S) -> Iterator[str]:
        """Log text as it is written, until the job ends: every line once, in order.

        Ray's log stream (a websocket) starts at the beginning of the log each time it is
        opened. A stream that breaks while the job runs is opened again and the text already
        given is skipped; when the job has ended, one last full pass catches the lines a
        stream may drop at its very end (a finished job's log no longer grows). Connection
        trouble that lasts `give_up_after_s` is a UserError."""
        record = self.resolve(job)
        sid = record.submission_id
        given = 0   # characters of the log handed out so far
        trouble_since: float | None = None
        while True:
            try:
                ended = self.resolve(sid).status in TERMINAL
                seen = 0
                for chunk in self._tail(sid):
                    start, seen = seen, seen + len(chunk)
                    if seen > given:
                        yield chunk[max(0, given - start):]
                        given = seen
                    trouble_since = None
                if ended:
                    return
            except UserError:
                if trouble_since is None:
                    trouble_since = time.monotonic()
                if time.monotonic() - trouble_since > give_up_after_s:
                    raise
            except Exception:  # a dropped stream (RuntimeError, aiohttp errors): open it again
                if trouble_since is None:
                    trouble_since = time.monotonic()
                if time.monotonic() - trouble_since > give_up_after_s:
                    raise UserError(self._unreachable(
                        f"the log stream of {sid} kept breaking for {give_up_after_s:.0f} s"))
            time.sleep(reconnect_wait_s)

    def _tail(self, submission_id: str) -> Iterator[str]:
        """One pass of Ray's log stream: the log from its start, then text as it comes, until
        the stream closes."""
        import asyncio

        # tail_job_logs is an async generator; drive it chunk by chunk from sync code.
        loop = asyncio.new_event_loop()
        gen = self._client.tail_job_logs(submission_id).__aiter__()
        try:
            while True:
                try:
                    yield loop.run_until_complete(gen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(gen.aclose())
            loop.close()

    def stop(self, job: str) -> JobRecord:
        record = self.resolve(job)
        with self._errors(job):
            self._client.stop_job(record.submission_id)
        return record

    # -- submission ------------------------------------------------------------------

    def submit(self, *, name: str, entrypoint: str, runtime_env: dict,
               metadata: dict[str, str]) -> str:
        """Submit attempt N+1 of `name`; refuses while an earlier attempt is still active."""
        earlier = self.attempts(name)
        active = [r for r in earlier if r.status in ACTIVE]
        if active:
            r = active[-1]
            raise UserError(
                f"job name '{name}' is still {r.status} as submission {r.submission_id}; stop "
                f"it first (`pretrain stop {name}`) or submit under another --name.")
        attempt = max([r.attempt or 0 for r in earlier] + [0]) + 1
        taken = {r.submission_id for r in self._list_raw()}
        while f"{name}-{attempt}" in taken:  # an id someone else chose; ids are forever
            attempt += 1
        meta = {**metadata, META_NAME: name, META_ATTEMPT: str(attempt)}
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with self._errors():
                    return self._client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                   submission_id=f"{name}-{attempt}", metadata=meta)
            except RuntimeError as exc:
                # A head that just started answers before its job agent is up.
                if "No available agent" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise UserError(
                        f"the Ray cluster at {self.address} has no job agent to run the "
                        f"submission (still none after {AGENT_WAIT_S} s). The dashboard agent "
                        "of the head did not start: most often another Ray on that machine "
                        "holds its port (52365 unless --dashboard-agent-listen-port is given); "
                        "the head's logs/dashboard_agent.log says why. Restart the head with "
                        "free --dashboard-agent-listen-port / --dashboard-agent-grpc-port "
                        "values, or stop the other Ray.") from None
                time.sleep(1.0)


@contextlib.contextmanager
def _without_env(*names: str):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------
# What a submitted job carries


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(
            f"job name '{name}' is not valid: use 1-51 lowercase letters, digits, '-', '_' or "
            "'.', starting with a letter or digit (it becomes the Ray submission id NAME-N and "
            "a checkpoint folder).")
    return name


def default_name(config_path: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(config_path).stem.lower()).strip("-") or "job"
    return f"{stem[:40]}-{secrets.token_hex(3)}"


def named_checkpoint_uri(base: str | None, name: str) -> str | None:
    """Where the checkpoints of job `name` live: <checkpoint.uri>/<name>."""
    if not base:
        return None
    return base.rstrip("/") + "/" + name


def job_config(cfg, name: str, *, local_cwd: Path | None, where: str) -> dict:
    """The config tree job `name` runs, as a plain dict, checked again after the changes.

    Checkpoints go to <checkpoint.uri>/<name>. On a loopback cluster (`local_cwd` given)
    relative paths are anchored there; elsewhere a relative checkpoint path is refused, since
    it would land in the job's temporary working directory and nothing could resume from it.
    """
    from pretrain.train.config import ExperimentConfig, from_dict, to_dict

    raw = to_dict(cfg)
    storage.refuse_credentials_in_tree(raw)   # it travels in the runtime env and manifests
    raw["checkpoint"]["uri"] = named_checkpoint_uri(cfg.checkpoint.uri, name)
    # The job's MLflow run is named after the job (unless the config names it).
    raw["tracking"]["run_name"] = raw["tracking"].get("run_name") or name
    uri = raw["checkpoint"]["uri"]
    if local_cwd is not None:
        # Ray workers run in the job's working_dir copy, not where the user typed the
        # command: anchored, data, checkpoints and MLflow land where a local `pretrain run`
        # would have put them.
        raw = storage.absolute_locations(raw, local_cwd)
    elif uri and "://" not in uri and not os.path.isabs(uri):
        raise UserError(
            f"checkpoint.uri '{cfg.checkpoint.uri}' is a relative local path, which a job on "
            f"{where} would resolve inside its temporary working directory; set checkpoint.uri "
            "to shared storage (gs://BUCKET/PATH) or an absolute path on a volume every node "
            "mounts.")
    from_dict(ExperimentConfig, raw, source=f"the config of job {name}")
    return raw


def job_runtime_env(config_yaml: str, *, name: str, use_gpu: bool, grace_s: float,
                    working_dir: Path | None = PROJECT_ROOT, cwd: Path | None = None,
                    extra_env: dict[str, str] | None = None,
                    pass_env: tuple[str, ...] = (), tags: dict[str, str] | None = None) -> dict:
    """The runtime_env of a job: code (working_dir), resolved config, stop grace, env, tags.

    `extra_env` (a profile's job env) wins over the `pass_env` variables of this process.
    Values holding credentials in a URI are refused (pretrain/storage.py says why)."""
    import json

    for key in pass_env:
        storage.refuse_credentials(os.environ.get(key, ""), f"${key}")
    for key, value in (extra_env or {}).items():
        storage.refuse_credentials(str(value), f"job env {key}")
    env = {
        CONFIG_ENV: config_yaml,
        NAME_ENV: name,
        # Ray sends SIGTERM on `stop`, then SIGKILL this many seconds later (read by the
        # job's supervisor actor, which runs with this env): the run's own grace plus margin.
        "RAY_JOB_STOP_WAIT_TIME_S": str(int(grace_s) + STOP_MARGIN_S),
        # The driver's ray.init adds env vars of its own (DS_ACCELERATOR, MLFLOW_...); let
        # them merge with the job's instead of failing on the overlap.
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if cwd is not None:
        env[CWD_ENV] = str(cwd)
    if tags:
        env[TAGS_ENV] = json.dumps(tags, sort_keys=True)
    env.update(extra_env or {})
    return runtime_env(process_env(use_gpu), pass_env=pass_env, env=env,
                       working_dir=working_dir, excludes=UPLOAD_EXCLUDES)


# ---------------------------------------------------------------------------------------
# Reading a job's progress back


def progress_from_logs(text: str) -> dict:
    """Step, total steps, last loss and MLflow run id from `pretrain run` output, if present."""
    out: dict = {}
    matches = list(_PROGRESS_RE.finditer(text))
    if matches:
        last = matches[-1]
        out["step"], out["steps"] = int(last.group(1)), int(last.group(2))
        if last.group(3):
            with contextlib.suppress(ValueError):
                out["loss"] = float(last.group(3))
    runs = _MLFLOW_RE.findall(text)
    if runs:
        out["mlflow_run_id"] = runs[-1]
    summary = last_json_line(text)
    if summary:
        out["summary"] = summary
        out["mlflow_run_id"] = summary.get("mlflow_run_id") or out.get("mlflow_run_id")
        if summary.get("steps") is not None:
            out["step"] = summary["steps"]
    return out


def last_json_line(text: str) -> dict | None:
    import json

    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict) and "mlflow_run_id" in value:
                    return value
    return None


def latest_checkpoint(uri: str | None) -> dict | None:
    """The newest committed checkpoint under `uri`, when this machine can read it."""
    if not uri:
        return None
    try:
        from checkpoints.discovery import latest_committed

        info = latest_committed(uri)
    except Exception:  # storage this machine cannot reach (remote disk, no credentials)
        return None
    if info is None:
        return None
    return {"step": info.step, "uri": info.uri,
            "mlflow_run_id": info.manifest.mlflow_run_id if info.manifest else None}
