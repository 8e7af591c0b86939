"""The runtime environment: a training process's variables (pretrain/process_env.py) and the
Ray runtime_env that carries them to workers and jobs (orchestration/ray_env.py)."""
from __future__ import annotations

import os

import pytest
import yaml

from orchestration import ray_env
from orchestration.ray_jobs import CONFIG_ENV, job_runtime_env
from pretrain import process_env
from pretrain.train.config import ResourcesConfig


def test_cpu_config_sets_the_cpu_accelerator_and_thread_counts():
    env = process_env.config_env(ResourcesConfig(use_gpu=False, cpus_per_worker=3))
    assert env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "3"}
    env = process_env.config_env(ResourcesConfig(use_gpu=False, cpus_per_worker=3, threads_per_worker=2))
    assert env["OMP_NUM_THREADS"] == "2"
    # a fractional CPU reservation still gets one thread
    assert process_env.config_env(ResourcesConfig(cpus_per_worker=0.5))["OMP_NUM_THREADS"] == "1"


def test_gpu_config_does_not_force_the_cpu_accelerator():
    env = process_env.config_env(ResourcesConfig(use_gpu=True, cpus_per_worker=8))
    assert "DS_ACCELERATOR" not in env and env["OMP_NUM_THREADS"] == "8"


def test_apply_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    process_env.apply({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "4"})
    assert os.environ["DS_ACCELERATOR"] == "cuda" and os.environ["OMP_NUM_THREADS"] == "4"


def test_cli_default_accelerator_is_cpu_only_without_a_gpu(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(process_env, "machine_has_gpu", lambda: True)
    process_env.default_accelerator()
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(process_env, "machine_has_gpu", lambda: False)
    process_env.default_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_uses_cpu_and_the_conversion_tool_env(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert process_env.uses_cpu()
    monkeypatch.delenv("DS_ACCELERATOR")
    assert process_env.cpu_tool_env()["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert process_env.cpu_tool_env()["DS_ACCELERATOR"] == "cuda"


def test_worker_runtime_env_carries_the_process_env_and_passed_variables(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    resources = ResourcesConfig(use_gpu=False, cpus_per_worker=2)
    env = ray_env.runtime_env(process_env.config_env(resources), pass_env=ray_env.WORKER_PASS_ENV)
    assert env["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert env["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "STORAGE_EMULATOR_HOST" not in env["env_vars"]        # unset here: not passed
    assert "working_dir" not in env
    gpu = ray_env.runtime_env(process_env.config_env(ResourcesConfig(use_gpu=True)))
    assert "DS_ACCELERATOR" not in gpu["env_vars"]


@pytest.mark.parametrize("use_gpu", [False, True])
def test_job_runtime_env_carries_accelerator_config_and_env(monkeypatch, tmp_path, use_gpu):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mine:5000")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9023")
    env = job_runtime_env("train: {steps: 3}\n", name="j", use_gpu=use_gpu, grace_s=10,
                          working_dir=tmp_path, extra_env={"MLFLOW_TRACKING_URI": "http://profile:5000"},
                          pass_env=("MLFLOW_TRACKING_URI",))
    v = env["env_vars"]
    assert (v.get("DS_ACCELERATOR") == "cpu") is (not use_gpu)
    assert yaml.safe_load(v[CONFIG_ENV]) == {"train": {"steps": 3}}
    assert v["RAY_JOB_STOP_WAIT_TIME_S"] == "40"
    assert v["MLFLOW_TRACKING_URI"] == "http://profile:5000"      # the profile wins
    assert "STORAGE_EMULATOR_HOST" not in v                       # not asked to pass
    assert env["working_dir"] == str(tmp_path) and ".git" in env["excludes"]
