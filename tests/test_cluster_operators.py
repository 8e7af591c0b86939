"""Operator-facing parts of rendered clusters: Kueue queues and priorities, what happens to a
finished RayJob, who can reach the dashboard, the token file, env names and credentials.
Every manifest is checked against the KubeRay CRDs (../shared/schemas/kuberay)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import render, validate
from cluster.profiles import load_profile
from orchestration.cli import main as cli
from orchestration.commands.cluster import render_job
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
SCHEMAS = SHARED_SCHEMAS if SHARED_SCHEMAS.is_dir() else validate.SCHEMA_DIR
GPU_CONFIG = str(REPO / "configs" / "tubevit-b.yaml")
CPU_CONFIG = str(REPO / "configs" / "smoke.yaml")
CPU_OVERRIDES = ["checkpoint.uri=gs://bucket/smoke"]


def _render(profile: str, sets: list[str], config: str = GPU_CONFIG, overrides=()) -> dict:
    files = render_job(profile, config, 8, overrides=list(overrides), profile_overrides=sets)
    for manifest in files.values():
        if manifest.get("kind") in validate.CRD_FILES:
            assert validate.manifest_errors(manifest, SCHEMAS) == [], manifest["kind"]
    return files


def test_kueue_queue_and_priority_are_labels_on_the_rayjob_and_cluster():
    files = _render("gke-8xh100", ["kueue.queue=team-vision", "kueue.priority_class=high"])
    for manifest in files.values():
        labels = manifest["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-vision"
        assert labels["kueue.x-k8s.io/priority-class"] == "high"
    job = files["rayjob.yaml"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True   # Kueue admits only these
    plain = _render("gke-8xh100", [])
    assert not any(k.startswith("kueue.x-k8s.io") for k in plain["rayjob.yaml"]["metadata"]["labels"])


@pytest.mark.parametrize("sets,match", [
    (["kueue.priority_class=high"], "kueue.priority_class is set but kueue.queue is not"),
    (["kueue.queue=Team_Vision"], "kueue.queue 'Team_Vision' is not a Kubernetes name"),
    (["kueue.queue=q", "cleanup.delete_job_after_s=7200"], "cannot be used with kueue.queue"),
    (["cleanup.delete_job_after_s=60"], "below cleanup.ttl_s"),
    (["cleanup.ttl_s=-1"], "cleanup.ttl_s"),
])
def test_bad_kueue_and_cleanup_values_name_the_key(sets, match):
    with pytest.raises(UserError, match=match):
        load_profile("gke-8xh100", sets)


def test_finished_rayjobs_are_cleaned_up_as_the_profile_says():
    default = _render("gke-8xh100", [])["rayjob.yaml"]["spec"]
    assert (default["shutdownAfterJobFinishes"], default["ttlSecondsAfterFinished"]) == (True, 3600)
    assert "deletionStrategy" not in default
    short = _render("gke-8xh100", ["cleanup.ttl_s=600"])["rayjob.yaml"]["spec"]
    assert short["ttlSecondsAfterFinished"] == 600
    rules = _render("gke-8xh100", ["cleanup.ttl_s=600", "cleanup.delete_job_after_s=86400"])
    spec = rules["rayjob.yaml"]["spec"]
    # KubeRay: rules exclude shutdownAfterJobFinishes, and a TTL needs shutdownAfterJobFinishes
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
    got = {(r["condition"]["jobStatus"], r["policy"]): r["condition"]["ttlSeconds"]
           for r in spec["deletionStrategy"]["deletionRules"]}
    assert got == {("SUCCEEDED", "DeleteCluster"): 600, ("FAILED", "DeleteCluster"): 600,
                   ("SUCCEEDED", "DeleteSelf"): 86400, ("FAILED", "DeleteSelf"): 86400}


def test_auth_disabled_warns_and_keeps_the_dashboard_on_loopback(tmp_path, capsys):
    token = _render("gke-8xh100", [])
    assert token["raycluster.yaml"]["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] \
        == "0.0.0.0"
    assert cli(["cluster", "render", "gke-8xh100", "--config", GPU_CONFIG, "--workers", "8",
                "--set", "auth=disabled", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert "WARNING" in err and "auth: disabled" in err and "kubectl port-forward" in err
    cluster = yaml.safe_load((tmp_path / "raycluster.yaml").read_text())
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert "authOptions" not in cluster["spec"]
    assert validate.manifest_errors(cluster, SCHEMAS) == []
    assert not (tmp_path / "rayjob.yaml").exists()   # its operator needs an open dashboard
    vm = render_job("gcp-vm-8xa100", GPU_CONFIG, 8, profile_overrides=["auth=disabled"])
    head = " ".join(vm["cluster.yaml"]["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_launcher_token_file_is_readable_by_its_owner_only():
    vm = render_job("gcp-vm-8xa100", GPU_CONFIG, 8)["cluster.yaml"]
    fetch = vm["initialization_commands"][0]
    assert "umask 077" in fetch and "chmod 0600" in fetch and "0644" not in fetch
    assert validate.launcher_errors(vm) == []


@pytest.mark.parametrize("bad", ["job.env.A;touch /tmp/x=1", "job.env.1ST=1", "job.env.A B=1"])
def test_env_names_from_set_are_checked_before_they_reach_ray_start(bad):
    with pytest.raises(UserError, match="is not an environment variable name"):
        load_profile("gcp-vm-8xa100", [bad])
    ok = load_profile("gcp-vm-8xa100", ["job.env.NCCL_IB_DISABLE=1"])
    assert ok["job"]["env"]["NCCL_IB_DISABLE"] == 1


def test_secret_env_names_are_checked(tmp_path):
    own = tmp_path / "p.yaml"
    own.write_text("kubernetes: {secret_env: [{env: 'X=$(id)', secret: s, key: k}]}\n")
    with pytest.raises(UserError, match=r"secret_env\[0\].env .* is not an environment variable"):
        load_profile(str(own))


def test_credentials_in_uris_are_refused_before_anything_is_rendered():
    with pytest.raises(UserError) as err:
        render_job("local", CPU_CONFIG, 2, overrides=[
            *CPU_OVERRIDES, "tracking.tracking_uri=https://alice:s3cret@mlflow.example.com"])
    text = str(err.value)
    assert "'tracking.tracking_uri'" in text and "s3cret" not in text and "alice" not in text
    assert "https://***@mlflow.example.com" in text and "kubernetes.secret_env" in text
    with pytest.raises(UserError, match="job.env.MLFLOW_TRACKING_URI holds credentials"):
        load_profile("local", ["job.env.MLFLOW_TRACKING_URI=https://bob:pw@host"])
    # a user name alone is no secret elsewhere; plain URIs pass
    files = _render("local", [], CPU_CONFIG, [*CPU_OVERRIDES,
                                              "tracking.tracking_uri=https://mlflow.example.com"])
    assert "rayjob.yaml" in files
