"""Cluster profiles -> KubeRay manifests and Ray launcher configs, checked against the real
schemas: the KubeRay CRDs in ../shared/schemas/kuberay (beside the clone; the vendored copies
in cluster/schemas/ when that folder is absent) and ray/autoscaler/ray-schema.json."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from cluster import render, validate
from cluster.profiles import load_profile, profile_names
from orchestration.cli import main as cli
from orchestration.commands.cluster import render_job
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
SCHEMAS = SHARED_SCHEMAS if SHARED_SCHEMAS.is_dir() else validate.SCHEMA_DIR
GPU_CONFIG = REPO / "configs" / "tubevit-b.yaml"
CPU_CONFIG = REPO / "configs" / "smoke.yaml"


def _shape_of(cfg_path: Path, workers: int, overrides=()) -> render.JobShape:
    from pretrain.train.config import load_config

    r = load_config(cfg_path, [*overrides, f"resources.workers={workers}"]).resources
    return render.JobShape(r.workers, r.use_gpu, r.cpus_per_worker, 1 if r.use_gpu else 0)


def _scaling_config(shape: render.JobShape):
    """The ScalingConfig orchestration/driver.py builds for this shape."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=shape.workers, use_gpu=shape.use_gpu,
                         resources_per_worker=shape.resources_per_worker())


def _cases():
    for name in profile_names():
        p = load_profile(name)
        if p["worker"]["gpus"]:
            yield name, GPU_CONFIG, 16, ()
            yield name, GPU_CONFIG, 3, ()  # a partial node
        else:
            yield name, CPU_CONFIG, 2, ("checkpoint.uri=gs://bucket/smoke",)
            yield name, CPU_CONFIG, 7, ("checkpoint.uri=gs://bucket/smoke",)


def test_vendored_crds_match_shared():
    if not SHARED_SCHEMAS.is_dir():
        pytest.skip(f"{SHARED_SCHEMAS} is not beside this clone")
    for fname in validate.CRD_FILES.values():
        assert (validate.SCHEMA_DIR / fname).read_bytes() == (SHARED_SCHEMAS / fname).read_bytes()


def test_every_packaged_profile_is_listed():
    assert set(profile_names()) >= {"local", "gke-8xh100", "gke-8xa100", "gcp-vm-8xa100"}


@pytest.mark.parametrize("profile,config,workers,overrides", list(_cases()),
                         ids=lambda v: getattr(v, "name", str(v)))
def test_rendered_manifests_validate_and_match_scaling_config(profile, config, workers, overrides):
    files = render_job(profile, str(config), workers, overrides=list(overrides))
    shape = _shape_of(config, workers, overrides)
    scaling = _scaling_config(shape)
    per_worker = scaling._resources_per_worker_not_none
    p = load_profile(profile)
    if p["platform"] == "gcp-vm":
        launcher = files["cluster.yaml"]
        assert validate.launcher_errors(launcher) == []
        node = launcher["available_node_types"][p["worker"]["group"]]
        nodes, cpus, gpus = node["min_workers"], node["resources"]["CPU"], node["resources"].get("GPU", 0)
        assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    else:
        for manifest in files.values():
            assert validate.manifest_errors(manifest, SCHEMAS) == [], manifest["kind"]
        specs = [files["raycluster.yaml"]["spec"], files["rayjob.yaml"]["spec"]["rayClusterSpec"]]
        assert specs[0] == specs[1]
        spec = specs[0]
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training on head
        (group,) = spec["workerGroupSpecs"]
        nodes = group["replicas"]
        cpus = float(group["rayStartParams"]["num-cpus"])
        gpus = int(group["rayStartParams"]["num-gpus"])
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert float(limits["cpu"]) == cpus
        assert int(limits.get("nvidia.com/gpu", 0)) == gpus
        # the job inside the RayJob trains the same shape
        env = yaml.safe_load(files["rayjob.yaml"]["spec"]["runtimeEnvYAML"])["env_vars"]
        job_cfg = yaml.safe_load(env["PRETRAIN_JOB_CONFIG"])
        assert job_cfg["resources"]["workers"] == scaling.num_workers
        assert job_cfg["resources"]["use_gpu"] == scaling.use_gpu
    # Enough room for every worker, and no idle node: one node fewer would not hold them.
    fit = min([math.floor(cpus / per_worker["CPU"])]
              + ([math.floor(gpus / per_worker["GPU"])] if scaling.use_gpu else []))
    assert nodes * fit >= scaling.num_workers
    assert (nodes - 1) * fit < scaling.num_workers
    if scaling.use_gpu:
        assert gpus >= per_worker["GPU"]


def _gke_cluster() -> dict:
    files = render_job("gke-8xh100", str(GPU_CONFIG), 16)
    return files["raycluster.yaml"]


@pytest.mark.parametrize("mutate,expect", [
    (lambda m: m["spec"]["workerGroupSpecs"][0].__setitem__("replica", 2), "replica"),
    (lambda m: m["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "2"), "integer"),
    (lambda m: m["spec"]["workerGroupSpecs"][0].__setitem__("replicas", 2**40), "int32"),
    (lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["resources"]["limits"].__setitem__("memory", "lots"), "memory"),
    (lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
        copy.deepcopy(m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])), "same name"),
    (lambda m: m["metadata"].__setitem__("name", "Not_A_Name"), "metadata.name"),
    (lambda m: m["spec"].__setitem__("authOptions", {"mode": "password"}), "authOptions.mode"),
    (lambda m: m.__setitem__("apiVersion", "ray.io/v1alpha2"), "apiVersion"),
])
def test_schema_rejects_broken_manifests(mutate, expect):
    manifest = copy.deepcopy(_gke_cluster())
    assert validate.manifest_errors(manifest, SCHEMAS) == []
    mutate(manifest)
    errors = validate.manifest_errors(manifest, SCHEMAS)
    assert errors and any(expect in e for e in errors), errors


def test_int_or_string_quantities_accept_both():
    manifest = copy.deepcopy(_gke_cluster())
    limits = manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 200  # integer form of a quantity
    assert validate.manifest_errors(manifest, SCHEMAS) == []


def test_launcher_schema_rejects_broken_configs():
    launcher = render_job("gcp-vm-8xa100", str(GPU_CONFIG), 16)["cluster.yaml"]
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["a100"]["resources"]["GPU"] = 0.5
    bad["max_wrkers"] = 3
    errors = validate.launcher_errors(bad)
    assert any("GPU" in e for e in errors) and any("max_wrkers" in e for e in errors)
    bad = copy.deepcopy(launcher)
    bad["head_node_type"] = "nope"
    assert any("head_node_type" in e for e in validate.launcher_errors(bad))


def test_credentials_are_references_only():
    files = render_job("gke-8xa100", str(GPU_CONFIG), 8)
    for manifest in files.values():
        text = yaml.safe_dump(manifest)
        spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
        assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "tubevit-trainer"  # Workload Identity
            for env in pod["containers"][0].get("env", []):
                if "TOKEN" in env["name"] or "SECRET" in env["name"]:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"]
        assert "RAY_AUTH_TOKEN" not in text
    vm = render_job("gcp-vm-8xa100", str(GPU_CONFIG), 8)["cluster.yaml"]
    node = vm["available_node_types"]["a100"]["node_config"]
    assert node["serviceAccounts"][0]["email"].endswith(".iam.gserviceaccount.com")
    assert "gcloud secrets versions access" in vm["initialization_commands"][0]


def test_profile_rejects_inline_secrets_and_unknown_keys(tmp_path):
    with pytest.raises(UserError, match="job.env.HF_TOKEN looks like a credential"):
        load_profile("local", ["job.env.HF_TOKEN=abc123"])
    with pytest.raises(UserError, match="'worker.gpu' is unknown"):
        load_profile("local", ["worker.gpu=8"])
    own = tmp_path / "mine.yaml"
    own.write_text("platform: kubernetes\nworker: {cpus: 16, memroy: 64Gi}\n")
    with pytest.raises(UserError, match="worker.memroy"):
        load_profile(str(own))
    own.write_text("worker: {cpus: 16, memory: 64Gi, max_nodes: 2}\n")
    assert load_profile(str(own))["worker"]["cpus"] == 16


def test_profile_keys_are_typed_and_checked_by_the_config_loader(tmp_path):
    with pytest.raises(UserError, match="'worker.cpus'.*none of integer or number"):
        load_profile("local", ["worker.cpus=lots"])
    with pytest.raises(UserError, match="'platform' is 'aws'; valid choices: kubernetes, gcp-vm"):
        load_profile("local", ["platform=aws"])
    with pytest.raises(UserError, match="'gcp.project_id' must be a string"):
        load_profile("local", ["gcp.project_id=3"])          # null by default, a string when set
    with pytest.raises(UserError, match="'worker.max_nodes' is 0; it must be >= 1"):
        load_profile("local", ["worker.max_nodes=0"])
    with pytest.raises(UserError, match="'worker.gpus' is nan"):
        load_profile("local", ["worker.gpus=.nan"])
    base = tmp_path / "base.yaml"          # an operator's profile may derive from another file
    base.write_text("worker: {cpus: 16, memory: 64Gi, max_nodes: 2}\n")
    (tmp_path / "mine.yaml").write_text("base: base.yaml\nworker: {max_nodes: 3}\n")
    mine = load_profile(str(tmp_path / "mine.yaml"), {"worker.gpus": 1})
    assert (mine["worker"]["cpus"], mine["worker"]["max_nodes"], mine["worker"]["gpus"]) == (16, 3, 1)
    defaults = yaml.safe_load((REPO / "cluster" / "profiles" / "defaults.yaml").read_text())
    assert mine["name"] == "mine" and mine["head"] == defaults["head"]


def test_shapes_that_do_not_fit_are_user_errors():
    with pytest.raises(UserError, match="has no GPUs"):
        render_job("local", str(GPU_CONFIG), 2)
    with pytest.raises(UserError, match="worker.max_nodes=16"):
        render_job("gke-8xa100", str(GPU_CONFIG), 8 * 16 + 1)
    with pytest.raises(UserError, match="cpus_per_worker"):
        render_job("gke-8xa100", str(GPU_CONFIG), 8, overrides=["resources.cpus_per_worker=100"])
    with pytest.raises(UserError, match="relative local path"):
        render_job("local", str(CPU_CONFIG), 2)  # runs/smoke/checkpoints: nothing could resume


def test_cli_list_and_render(tmp_path, capsys):
    assert cli(["cluster", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["profiles"]
    assert {r["name"]: r["worker_gpus"] for r in rows}["gke-8xh100"] == 8
    out = tmp_path / "k8s"
    assert cli(["cluster", "render", "gke-8xh100", "--config", str(GPU_CONFIG), "train.steps=20000",
                "--workers", "16", "--out", str(out), "--json"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]
    assert sorted(Path(f).name for f in written) == ["raycluster.yaml", "rayjob.yaml"]
    job = yaml.safe_load((out / "rayjob.yaml").read_text())
    assert validate.manifest_errors(job, SCHEMAS) == []
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert yaml.safe_load(env["PRETRAIN_JOB_CONFIG"])["train"]["steps"] == 20000
    assert cli(["cluster", "render", "nope", "--config", str(GPU_CONFIG), "--workers", "1",
                "--out", str(out)]) == 2
    assert "valid profiles" in capsys.readouterr().err


@pytest.mark.parametrize("need,warns", [(30, True), (25, False), (10, False)])
def test_render_warns_when_nodes_have_too_few_cpus_per_accelerator(tmp_path, capsys, need, warns):
    # gke-8xh100: 200 CPUs and 8 GPUs per worker node -> 25 CPUs per accelerator
    assert cli(["cluster", "render", "gke-8xh100", "--config", str(GPU_CONFIG), "--workers", "8",
                "--out", str(tmp_path), "--decode-cores-per-accelerator", str(need)]) == 0
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert ("has 25 CPUs per accelerator" in err and f"needs {need} cores" in err) == warns
    assert ("warning" in err) == warns and "Traceback" not in err


def test_decode_cores_warning_ignores_cpu_only_profiles():
    assert render.decode_cores_warning(load_profile("local"), 100) is None
    assert "about 50% of the time" in render.decode_cores_warning(
        load_profile("gke-8xh100", ["worker.cpus=100"]), 25)
