"""Cluster profiles: plain YAML data, layered defaults -> profile -> overrides.

`profiles/defaults.yaml` holds every key a profile may set, with its default and what it
means; each other file in `profiles/` is one cluster and states only what differs (it may
also start from another profile with `base: other.yaml`). A profile argument is either a
packaged name (`gke-8xh100`) or the path of a YAML file of the same shape, so operators can
keep their own clusters outside the package. Overrides (`worker.max_nodes=4`, values parsed
as YAML) are applied last. The layers are merged and checked by the project's config loader
(pretrain/config_loader.py) against the typed schema below (unknown keys, types, ranges,
choices); the rules of this module add Kubernetes quantities, secrets written inline and the
platform's required keys. Every error names the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pretrain import config_loader, storage
from pretrain.config_loader import config_field
from pretrain.errors import UserError

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULTS = "defaults"
# A Kubernetes resource quantity (the CRDs' own pattern, without exponents).
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE])?$")
# What a shell and Kubernetes accept as an environment variable name (it is written into
# `ray start` command lines and pod specs).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A Kubernetes label value / object name (Kueue queue and priority class names).
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SECRET_LIKE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY",
                          re.IGNORECASE)


# The schema. Every default (and its documentation) is in profiles/defaults.yaml, the first
# layer of every profile, so the fields here declare types and limits only.

def _key(help: str = "", **limits):
    return config_field(help=help, required=True, **limits)


@dataclass
class HeadProfile:
    cpus: int | float = _key("CPUs of the head pod")
    memory: str | int = _key("memory of the head pod (a Kubernetes quantity, e.g. 32Gi)")
    node_selector: dict[str, Any] = _key("Kubernetes node labels for the head pod")


@dataclass
class WorkerProfile:
    group: str = _key("worker group / node type name")
    cpus: int | float = _key("CPUs Ray may schedule on one worker node")
    gpus: int = _key("GPUs per worker node", min=0)
    memory: str | int = _key("memory of one worker node (a Kubernetes quantity)")
    shm: str | int = _key("/dev/shm size (a Kubernetes quantity; 0 for none)")
    accelerator: str | None = _key("GKE accelerator label value")
    node_selector: dict[str, Any] = _key("Kubernetes node labels for worker pods")
    tolerations: list[dict[str, Any]] = _key("Kubernetes tolerations, as written in a pod spec")
    max_nodes: int = _key("the most worker nodes this cluster can have", min=1)


@dataclass
class KubernetesProfile:
    namespace: str = _key("Kubernetes namespace")
    service_account: str | None = _key("Kubernetes service account of every Ray pod")
    auth_secret: str | None = _key("Kubernetes secret holding the Ray auth token")
    secret_env: list[Any] = _key("[{env, secret, key}]: environment variables from secrets")
    secret_files: list[Any] = _key("[{secret, path}]: secrets mounted as files")


@dataclass
class GcpProfile:
    project_id: str | None = _key("Google Cloud project")
    region: str = _key("region")
    zone: str = _key("zone")
    head_machine_type: str = _key("machine type of the head VM")
    worker_machine_type: str | None = _key("machine type of the worker VMs")
    accelerator_type: str | None = _key("GPU type of the worker VMs, e.g. nvidia-tesla-a100")
    disk_image: str = _key("boot disk image")
    disk_gb: int = _key("boot disk size in GB", min=1)
    service_account: str | None = _key("Google service account the VMs run as")
    auth_secret: str | None = _key("Secret Manager secret holding the Ray auth token")


@dataclass
class JobProfile:
    env: dict[str, Any] = _key("plain (non-secret) environment variables for every job")
    max_preemptions: int | None = _key(
        "node preemptions (drains) a job survives: its resources.max_preemptions unless the "
        "job sets that itself; -1 any number; null: the config's", min=-1)


@dataclass
class KueueProfile:
    queue: str | None = _key("Kueue LocalQueue the RayJob / RayCluster is submitted to "
                             "(label kueue.x-k8s.io/queue-name); null: not queued by Kueue")
    priority_class: str | None = _key("Kueue WorkloadPriorityClass of the workload (label "
                                      "kueue.x-k8s.io/priority-class); needs kueue.queue")


@dataclass
class CleanupProfile:
    ttl_s: int = _key("seconds a finished RayJob keeps its Ray cluster (to read its logs) "
                      "before KubeRay deletes the cluster", min=0)
    delete_job_after_s: int | None = _key(
        "also delete the RayJob resource itself this many seconds after it finishes "
        "(KubeRay deletionStrategy rules, feature gate RayJobDeletionPolicy); null: keep it")


@dataclass
class ClusterProfile:
    description: str = _key("one line about this cluster")
    platform: Literal["kubernetes", "gcp-vm"] = _key(
        "kubernetes (KubeRay RayCluster/RayJob) or gcp-vm (`ray up` launcher)")
    address: str | None = _key("Ray Jobs API (dashboard) URL for `pretrain submit --profile`")
    auth: Literal["token", "disabled"] = _key("Ray token auth")
    ray_version: str = _key("Ray version of the image")
    image: str = _key("container image with Ray and this project installed")
    head: HeadProfile = _key()
    worker: WorkerProfile = _key()
    kubernetes: KubernetesProfile = _key()
    gcp: GcpProfile = _key("platform gcp-vm only")
    job: JobProfile = _key()
    kueue: KueueProfile = _key("platform kubernetes only")
    cleanup: CleanupProfile = _key("what happens to a finished RayJob (platform kubernetes)")


def profile_names() -> list[str]:
    """The packaged profiles, sorted (defaults.yaml is a layer, not a profile)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if p.stem != DEFAULTS)


def load_profile(name_or_path: str, overrides: list[str] | dict | None = None) -> dict:
    """The merged, checked profile as a nested dict; its `name` key says where it came from."""
    path = _find(name_or_path)
    raw = config_loader.merge(config_loader.read_config_file(PROFILE_DIR / f"{DEFAULTS}.yaml"),
                              config_loader.read_config_file(path))
    config_loader.apply_overrides(raw, overrides or [])
    where = f"profile '{path.stem}'"
    merged = config_loader.to_dict(config_loader.from_dict(ClusterProfile, raw, source=where))
    merged["name"] = path.stem
    _check_values(merged, where)
    return merged


def config_overrides(profile: dict | None) -> list[str]:
    """The training-config overrides a profile implies, to go before the job's own (which
    win): `job.max_preemptions` -> resources.max_preemptions."""
    n = ((profile or {}).get("job") or {}).get("max_preemptions")
    return [] if n is None else [f"resources.max_preemptions={int(n)}"]


def _find(name_or_path: str) -> Path:
    packaged = PROFILE_DIR / f"{name_or_path}.yaml"
    if name_or_path != DEFAULTS and packaged.is_file():
        return packaged
    as_path = Path(name_or_path)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    raise UserError(
        f"cluster profile '{name_or_path}' is unknown; valid profiles: "
        f"{', '.join(profile_names())} (see `pretrain cluster list`), or the path of a YAML "
        f"file shaped like {PROFILE_DIR / 'defaults.yaml'}.")


def _check_values(p: dict, where: str) -> None:
    for section in ("head", "worker"):
        for key in ("memory", "shm"):
            value = p[section].get(key)
            if value is not None and value != 0 and not _QUANTITY.match(str(value)):
                raise UserError(f"{where}: {section}.{key} '{value}' is not a Kubernetes "
                                "quantity; write e.g. 64Gi, 512Mi or 0.")
        if p[section]["cpus"] <= 0:
            raise UserError(f"{where}: {section}.cpus must be > 0, got {p[section]['cpus']}.")
    w = p["worker"]
    if p["auth"] == "token" and p["platform"] == "kubernetes" and not p["kubernetes"]["auth_secret"]:
        raise UserError(f"{where}: auth is token but kubernetes.auth_secret is empty; name "
                        "the Kubernetes secret that holds the Ray auth token.")
    if p["platform"] == "gcp-vm":
        for key in ("project_id", "worker_machine_type"):
            if not p["gcp"][key]:
                raise UserError(f"{where}: platform gcp-vm needs gcp.{key}.")
        if w["gpus"] and not p["gcp"]["accelerator_type"]:
            raise UserError(f"{where}: worker.gpus is {w['gpus']} but gcp.accelerator_type is "
                            "not set (e.g. nvidia-tesla-a100).")
    for name, value in p["job"]["env"].items():
        if not _ENV_NAME.match(str(name)):
            raise UserError(f"{where}: job.env key {str(name)!r} is not an environment variable "
                            "name; use letters, digits and '_', not starting with a digit.")
        if _SECRET_LIKE.search(str(name)):
            raise UserError(
                f"{where}: job.env.{name} looks like a credential; profiles never hold secret "
                "values. Reference a Kubernetes secret instead: kubernetes.secret_env: "
                f"[{{env: {name}, secret: SECRET_NAME, key: KEY}}].")
        if not isinstance(value, (str, int, float, bool)):
            raise UserError(f"{where}: job.env.{name} must be a plain value, got {value!r}.")
        if storage.credentials_in(str(value)):
            raise UserError(f"{where}: job.env.{name} holds credentials inside a URI "
                            f"({storage.redact_text(str(value))}). {storage.CREDENTIALS_HOWTO}")
    for i, ref in enumerate(p["kubernetes"]["secret_env"]):
        if not isinstance(ref, dict) or set(ref) != {"env", "secret", "key"}:
            raise UserError(f"{where}: kubernetes.secret_env[{i}] must be {{env, secret, key}} "
                            f"(names only), got {ref!r}.")
        if not _ENV_NAME.match(str(ref["env"])):
            raise UserError(f"{where}: kubernetes.secret_env[{i}].env {ref['env']!r} is not an "
                            "environment variable name; use letters, digits and '_', not "
                            "starting with a digit.")
    _check_kueue_and_cleanup(p, where)
    for i, ref in enumerate(p["kubernetes"]["secret_files"]):
        if not isinstance(ref, dict) or set(ref) != {"secret", "path"}:
            raise UserError(f"{where}: kubernetes.secret_files[{i}] must be {{secret, path}}, "
                            f"got {ref!r}.")


def _check_kueue_and_cleanup(p: dict, where: str) -> None:
    kueue, cleanup = p["kueue"], p["cleanup"]
    for key in ("queue", "priority_class"):
        value = kueue[key]
        if value is not None and (len(str(value)) > 63 or not _K8S_NAME.match(str(value))):
            raise UserError(f"{where}: kueue.{key} {value!r} is not a Kubernetes name (lowercase "
                            "letters, digits, '-' and '.', at most 63, starting and ending with a "
                            "letter or digit).")
    if kueue["priority_class"] and not kueue["queue"]:
        raise UserError(f"{where}: kueue.priority_class is set but kueue.queue is not; Kueue "
                        "only orders workloads of a queue (set kueue.queue=LOCAL_QUEUE).")
    if (kueue["queue"] or kueue["priority_class"]) and p["platform"] != "kubernetes":
        raise UserError(f"{where}: kueue.* applies to platform kubernetes only (this profile "
                        f"is {p['platform']}).")
    after = cleanup["delete_job_after_s"]
    if after is not None:
        if after < cleanup["ttl_s"]:
            raise UserError(f"{where}: cleanup.delete_job_after_s ({after}) is below "
                            f"cleanup.ttl_s ({cleanup['ttl_s']}); the RayJob can only go after "
                            "its cluster.")
        if kueue["queue"]:
            raise UserError(
                f"{where}: cleanup.delete_job_after_s cannot be used with kueue.queue: Kueue "
                "admits only RayJobs with shutdownAfterJobFinishes, which KubeRay's deletion "
                "rules exclude; keep cleanup.ttl_s (the cluster goes, the RayJob stays) or "
                "have the operator set DELETE_RAYJOB_CR_AFTER_JOB_FINISHES.")
