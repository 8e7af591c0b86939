"""Profiles + a job's shape -> KubeRay RayCluster / RayJob manifests or a Ray launcher config.

The job's shape is what its Ray Train `ScalingConfig` asks for (workers, CPUs and GPUs per
worker). `place` decides how many worker nodes of the profile hold that many workers and
refuses shapes that cannot fit; every renderer sizes the cluster from that one placement, so
the manifests and the ScalingConfig agree by construction (and the tests check it).

The head never runs training: it gets `num-cpus: 0` (Ray Train's controller actor needs no
CPU), all workers land on worker nodes. Storage credentials are references only: the pods'
Kubernetes service account (GKE Workload Identity), secret names for env vars and files,
KubeRay's `authOptions.secretName` for the Ray token; on GCP VMs, the VMs' service account
and a Secret Manager secret name.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass

import yaml

from pretrain.errors import UserError

SHM_VOLUME = "dshm"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
TOKEN_OWNER = "1000:100"   # the ray user of rayproject/ray images


@dataclass(frozen=True)
class JobShape:
    """What a training job asks Ray for: its ScalingConfig, in plain numbers."""

    workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float  # 0 when use_gpu is false

    def resources_per_worker(self) -> dict[str, float]:
        out = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out


@dataclass(frozen=True)
class Placement:
    nodes: int              # worker nodes (pods / VMs) the job needs
    workers_per_node: int   # training workers that fit on one


def place(profile: dict, shape: JobShape) -> Placement:
    """Worker nodes of `profile` needed for `shape`; UserError if it cannot fit."""
    w = profile["worker"]
    where = f"cluster profile '{profile['name']}'"
    fits = []
    if shape.cpus_per_worker > 0:
        fits.append(math.floor(w["cpus"] / shape.cpus_per_worker + 1e-9))
    if shape.use_gpu:
        if not w["gpus"]:
            raise UserError(
                f"the config asks for GPU workers (resources.use_gpu=true) but {where} has no "
                "GPUs (worker.gpus is 0); pick a GPU profile (see `pretrain cluster list`) or set "
                "resources.use_gpu=false.")
        fits.append(math.floor(w["gpus"] / shape.gpus_per_worker + 1e-9))
    per_node = min(fits) if fits else shape.workers
    if per_node < 1:
        raise UserError(
            f"one worker needs {shape.cpus_per_worker:g} CPUs"
            + (f" and {shape.gpus_per_worker:g} GPUs" if shape.use_gpu else "")
            + f" but a worker node of {where} has {w['cpus']:g} CPUs and {w['gpus']} GPUs; lower "
            "resources.cpus_per_worker or pick a profile with bigger nodes.")
    per_node = min(per_node, shape.workers)
    nodes = math.ceil(shape.workers / per_node)
    if nodes > w["max_nodes"]:
        raise UserError(
            f"{shape.workers} workers need {nodes} worker nodes of {where} ({per_node} per node) "
            f"but it allows at most worker.max_nodes={w['max_nodes']}; use fewer workers or "
            f"raise the limit (--set worker.max_nodes={nodes}).")
    return Placement(nodes=nodes, workers_per_node=per_node)


def decode_cores_warning(profile: dict, need: float) -> str | None:
    """One paragraph when a worker node of `profile` has fewer CPUs per accelerator than
    `need` (the decode cores one accelerator keeps busy, `pretrain plan
    --decode-rate|--measure-decode`'s decode_cores_per_accelerator); None when it has enough
    or has no accelerators. A warning, not an error: the job runs, only slower, and the
    figure is an estimate at an assumed MFU."""
    w = profile["worker"]
    if not w["gpus"]:
        return None
    have = w["cpus"] / w["gpus"]
    if have >= need:
        return None
    return (f"warning: a worker node of cluster profile '{profile['name']}' has {have:g} CPUs per "
            f"accelerator ({w['cpus']:g} CPUs, {w['gpus']} GPUs) but decoding needs {need:g} cores "
            f"per accelerator (--decode-cores-per-accelerator); the accelerators would wait for "
            f"data about {1 - have / need:.0%} of the time. Pick a profile whose nodes have more "
            "CPUs per GPU, or store video that decodes faster.")


def k8s_name(text: str, limit: int = 40) -> str:
    """A DNS-1035 label from a job name (RayJob names get a suffix, hence the short limit)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "job-" + name
    return name[:limit].rstrip("-")


# ---------------------------------------------------------------------------------------
# KubeRay


def raycluster_spec(profile: dict, placement: Placement, grace_s: int) -> dict:
    """The `spec` of a RayCluster (also a RayJob's `rayClusterSpec`)."""
    head, worker, kube = profile["head"], profile["worker"], profile["kubernetes"]
    spec: dict = {
        "rayVersion": profile["ray_version"],
        "enableInTreeAutoscaling": False,  # sized for the job; no autoscaler to fight
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": dashboard_host(profile)},
            "serviceType": "ClusterIP",
            "template": {"spec": _pod_spec(
                profile, "ray-head", head, gpus=0, grace_s=grace_s, shm=None,
                ports=[("gcs-server", 6379), ("dashboard", 8265), ("client", 10001)])},
        },
        "workerGroupSpecs": [{
            "groupName": worker["group"],
            "replicas": placement.nodes,
            "minReplicas": placement.nodes,
            "maxReplicas": max(placement.nodes, worker["max_nodes"]),
            "rayStartParams": {"num-cpus": _num(worker["cpus"]),
                               "num-gpus": _num(worker["gpus"])},
            "template": {"spec": _pod_spec(profile, "ray-worker", worker, gpus=worker["gpus"],
                                           grace_s=grace_s, shm=worker.get("shm"))},
        }],
    }
    if profile["auth"] == "token":
        spec["authOptions"] = {"mode": "token", "secretName": kube["auth_secret"]}
    return spec


def _pod_spec(profile: dict, container: str, node: dict, *, gpus: int, grace_s: int,
              shm, ports: list[tuple[str, int]] = ()) -> dict:
    kube = profile["kubernetes"]
    resources = {"cpu": _num(node["cpus"]), "memory": str(node["memory"])}
    if gpus:
        resources["nvidia.com/gpu"] = int(gpus)
    env = [{"name": k, "value": str(v)} for k, v in sorted(profile["job"]["env"].items())]
    env += [{"name": ref["env"], "valueFrom": {"secretKeyRef": {"name": ref["secret"],
                                                               "key": ref["key"]}}}
            for ref in kube["secret_env"]]
    mounts, volumes = [], []
    if shm and str(shm) != "0":
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": str(shm)}})
    for i, ref in enumerate(kube["secret_files"]):
        vol = f"secret-{i}"
        mounts.append({"name": vol, "mountPath": ref["path"], "readOnly": True})
        volumes.append({"name": vol, "secret": {"secretName": ref["secret"]}})
    c: dict = {
        "name": container,
        "image": profile["image"],
        # requests == limits: Guaranteed QoS, so the kubelet never evicts a training pod first
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }
    if env:
        c["env"] = env
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    if mounts:
        c["volumeMounts"] = mounts
    pod: dict = {"containers": [c], "terminationGracePeriodSeconds": int(grace_s)}
    if volumes:
        pod["volumes"] = volumes
    if kube["service_account"]:
        pod["serviceAccountName"] = kube["service_account"]
    selector = dict(node.get("node_selector") or {})
    if gpus and node.get("accelerator"):
        selector["cloud.google.com/gke-accelerator"] = node["accelerator"]
    if selector:
        pod["nodeSelector"] = {k: str(v) for k, v in selector.items()}
    if node.get("tolerations"):
        pod["tolerations"] = list(node["tolerations"])
    return pod


def _labels(profile: dict, name: str) -> dict:
    labels = {"app.kubernetes.io/name": "tubevit-pretrain", "tubevit.io/job": name,
              "tubevit.io/profile": k8s_name(profile["name"], 63)}
    kueue = profile["kueue"]
    if kueue["queue"]:
        labels[KUEUE_QUEUE_LABEL] = kueue["queue"]
    if kueue["priority_class"]:
        labels[KUEUE_PRIORITY_LABEL] = kueue["priority_class"]
    return labels


# ---------------------------------------------------------------------------------------
# Exposure: who can reach the head's dashboard (its Jobs API runs any code it is sent)

LOOPBACK = "127.0.0.1"


def dashboard_host(profile: dict) -> str:
    """Where the head's dashboard listens: every interface with token auth (nodes, the
    KubeRay operator and port-forwards reach it, and it asks for the token); loopback only
    without auth (reach it through `kubectl port-forward` / `ray dashboard`, which connect
    from inside the head's network namespace)."""
    return "0.0.0.0" if profile["auth"] == "token" else LOOPBACK


def exposure_warning(profile: dict) -> str | None:
    """A loud paragraph when the profile turns Ray's token auth off; None otherwise."""
    if profile["auth"] == "token":
        return None
    reach = ("kubectl port-forward svc/NAME-head-svc 8265:8265" if profile["platform"] == "kubernetes"
             else "ray dashboard cluster.yaml")
    return (f"WARNING: cluster profile '{profile['name']}' has auth: disabled. Ray's Jobs API runs "
            "any code it is sent, so without a token anyone who reaches the dashboard controls "
            f"the cluster. The dashboard is therefore bound to {LOOPBACK} on the head: reach it "
            f"with `{reach}`. "
            + ("No rayjob.yaml is written: KubeRay's operator polls a RayJob's dashboard over the "
               "cluster network, which would need it open to everyone there. "
               if profile["platform"] == "kubernetes" else "")
            + "Use auth: token (the default) for anything but a throw-away cluster.")


def render_raycluster(profile: dict, placement: Placement, name: str, grace_s: int) -> dict:
    """A RayCluster for `pretrain submit --address` (long-lived; several jobs in turn)."""
    meta = {"name": k8s_name(name), "namespace": profile["kubernetes"]["namespace"],
            "labels": _labels(profile, k8s_name(name))}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta,
            "spec": raycluster_spec(profile, placement, grace_s)}


def render_rayjob(profile: dict, placement: Placement, name: str, grace_s: int, *,
                  entrypoint: str, runtime_env: dict, metadata: dict[str, str]) -> dict:
    """A self-contained RayJob: its own cluster, the job, the cluster gone when it ends."""
    meta = {"name": k8s_name(name), "namespace": profile["kubernetes"]["namespace"],
            "labels": _labels(profile, k8s_name(name))}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": dump_yaml(runtime_env),
        "metadata": {k: str(v) for k, v in metadata.items()},
        "submissionMode": "K8sJobMode",
        **cleanup_spec(profile["cleanup"]),
        "backoffLimit": 0,  # a failed run is resumed by resubmitting its name, not blindly
        "rayClusterSpec": raycluster_spec(profile, placement, grace_s),
    }}


def cleanup_spec(cleanup: dict) -> dict:
    """The RayJob fields for what happens after it finishes (profile `cleanup`).

    By default the cluster is deleted `ttl_s` after the job ends and the RayJob stays
    (shutdownAfterJobFinishes + ttlSecondsAfterFinished: what Kueue requires). With
    `delete_job_after_s`, KubeRay's deletion rules delete the cluster at ttl_s and the RayJob
    itself later, after success or failure alike; KubeRay makes those rules and
    shutdownAfterJobFinishes mutually exclusive."""
    ttl = int(cleanup["ttl_s"])
    after = cleanup["delete_job_after_s"]
    if after is None:
        return {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": ttl}
    rules = [{"condition": {"jobStatus": status, "ttlSeconds": seconds}, "policy": policy}
             for policy, seconds in (("DeleteCluster", ttl), ("DeleteSelf", int(after)))
             for status in ("SUCCEEDED", "FAILED")]
    return {"shutdownAfterJobFinishes": False, "deletionStrategy": {"deletionRules": rules}}


# ---------------------------------------------------------------------------------------
# Ray cluster launcher (`ray up`) on GCP VMs


def render_launcher(profile: dict, placement: Placement, name: str) -> dict:
    """A `ray up` config: one head VM and exactly the worker VMs the job needs."""
    if profile["platform"] != "gcp-vm":
        raise UserError(f"cluster profile '{profile['name']}' is for {profile['platform']}; "
                        "a cluster-launcher config needs a gcp-vm profile.")
    gcp, head, worker = profile["gcp"], profile["head"], profile["worker"]
    token_file = "/etc/ray-auth/auth_token"
    env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(profile["job"]["env"].items()))
    if profile["auth"] == "token":
        env = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_file} {env}".strip()
    env = (env + " ") if env else ""
    fetch_token = [] if profile["auth"] != "token" else [
        # On the VM (outside the container): the token from Secret Manager, by name, into a
        # file only its owner reads (created under umask 077, never world-readable), owned by
        # the container's user (rayproject images: ray, uid 1000, gid 100), which reads it
        # through the read-only mount below.
        f"sudo mkdir -p {token_file.rsplit('/', 1)[0]} && gcloud secrets versions access latest "
        f"--secret={shlex.quote(gcp['auth_secret'])} --project={shlex.quote(gcp['project_id'])} "
        f"| sudo sh -c 'umask 077 && cat > {token_file}' && sudo chown {TOKEN_OWNER} "
        f"{token_file} && sudo chmod 0600 {token_file}"]
    return {
        "cluster_name": k8s_name(name),
        "max_workers": max(placement.nodes, worker["max_nodes"]),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": "gcp", "region": gcp["region"], "availability_zone": gcp["zone"],
                     "project_id": gcp["project_id"], "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ray"},
        "docker": {
            "image": profile["image"], "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536", f"--shm-size={_docker_size(worker)}",
                            f"-v {token_file.rsplit('/', 1)[0]}:{token_file.rsplit('/', 1)[0]}:ro"],
        },
        "initialization_commands": fetch_token,
        "head_node_type": "ray_head",
        "available_node_types": {
            "ray_head": {
                "resources": {"CPU": 0},  # the head runs no training
                "min_workers": 0, "max_workers": 0,
                "node_config": _vm_config(gcp, gcp["head_machine_type"], 0),
            },
            worker["group"]: {
                "resources": {"CPU": int(worker["cpus"]), "GPU": int(worker["gpus"])},
                "min_workers": placement.nodes,
                "max_workers": max(placement.nodes, worker["max_nodes"]),
                "node_config": _vm_config(gcp, gcp["worker_machine_type"], int(worker["gpus"])),
            },
        },
        "setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {env}ray start --head --port=6379 --num-cpus=0 "
            f"--dashboard-host={dashboard_host(profile)} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {env}ray start --address=$RAY_HEAD_IP:6379 "
            f"--num-cpus={int(worker['cpus'])} --num-gpus={int(worker['gpus'])}",
        ],
    }


def _vm_config(gcp: dict, machine_type: str, gpus: int) -> dict:
    cfg: dict = {
        "machineType": machine_type,
        "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                   "initializeParams": {"diskSizeGb": int(gcp["disk_gb"]),
                                        "sourceImage": gcp["disk_image"]}}],
        "metadata": {"items": [{"key": "install-nvidia-driver", "value": "True"}]},
    }
    if gcp["service_account"]:
        cfg["serviceAccounts"] = [{"email": gcp["service_account"],
                                   "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    if gpus:
        cfg["guestAccelerators"] = [{"acceleratorType": gcp["accelerator_type"],
                                     "acceleratorCount": gpus}]
        cfg["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]  # GPU VMs cannot live-migrate
    return cfg


def _docker_size(worker: dict) -> str:
    shm = str(worker.get("shm") or "0")
    m = re.match(r"^(\d+)([KMGT])i?$", shm)
    return f"{m.group(1)}{m.group(2).lower()}" if m else "8g"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job's config inside runtimeEnvYAML) as readable | blocks."""


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(data) -> str:
    """YAML for manifests: key order kept, multi-line strings as blocks."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
