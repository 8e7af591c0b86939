"""The drain-notice poll's cadence and reactions, fast: `get_preemption_info` here is a FAKE
(a plain function standing in for `ray.train.get_preemption_info`, which only works inside
a Ray Train worker); tests/test_elastic_workers.py drains a real node."""
from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.train.config import ExperimentConfig, ResourcesConfig, TrainConfig
from pretrain.train.preemption_poll import PreemptionPoll, describe, notice_of


@dataclass
class FakeInfo:   # the fields of ray.train.v2.api.preemption.PreemptionInfo
    deadline_ms: int | None
    preempted_node_to_ranks: dict = field(default_factory=dict)


class FakeGetInfo:
    """Counts calls; answers None until `after` calls, then `info`."""

    def __init__(self, info=None, after: int = 0):
        self.info, self.after, self.calls = info, after, 0

    def __call__(self):
        self.calls += 1
        return self.info if self.calls > self.after else None


def test_polls_only_every_n_steps():
    fake = FakeGetInfo()
    poll = PreemptionPoll(fake, every=10)
    for step in range(1, 101):
        assert poll(step) is None
    assert fake.calls == 10 and poll.polls == 10


def test_zero_or_no_function_never_polls():
    fake = FakeGetInfo(FakeInfo(1, {"n": [1]}))
    assert all(PreemptionPoll(fake, every=0)(s) is None for s in range(1, 50))
    assert all(PreemptionPoll(None, every=5)(s) is None for s in range(1, 50))
    assert fake.calls == 0


def test_one_notice_reported_once_at_the_step_it_arrives(capsys):
    info = FakeInfo(1_900_000_000_000, {"abc123": [1]})
    reports = []
    poll = PreemptionPoll(FakeGetInfo(info, after=2), every=5, rank=0, report=reports.append)
    hits = {s: poll(s) for s in range(1, 41)}
    got = {s: n for s, n in hits.items() if n}
    assert list(got) == [15]   # polls at 5, 10 (None), 15 (the notice), then the same one
    assert got[15] == {"nodes": ["abc123"], "ranks": [1], "deadline_ms": 1_900_000_000_000,
                       "step": 15}
    assert reports == [{"preemption": got[15]}]
    assert capsys.readouterr().err == ""   # the driver prints the line it gets reported


def test_a_new_deadline_or_node_is_a_new_notice(capsys):
    fake = FakeGetInfo(FakeInfo(1000, {"a": [0]}))
    poll = PreemptionPoll(fake, every=1)   # no report: rank 0 prints the line itself
    assert poll(1) and not poll(2)
    fake.info = FakeInfo(1000, {"a": [0], "b": [1]})
    assert poll(3)["nodes"] == ["a", "b"]
    fake.info = FakeInfo(500, {"a": [0], "b": [1]})
    assert poll(4)["deadline_ms"] == 500
    assert len(poll.notices) == 3
    err = capsys.readouterr().err
    assert err.count("preemption notice: node") == 3 and "checkpoint at step 4" in err


def test_other_ranks_poll_too_but_stay_quiet(capsys):
    fake = FakeGetInfo(FakeInfo(None, {"a": [0]}))
    reports = []
    poll = PreemptionPoll(fake, every=2, rank=1, report=reports.append)
    assert poll(2)["step"] == 2 and fake.calls == 1
    assert reports == [] and capsys.readouterr().err == ""


def test_describe_names_node_and_deadline():
    line = describe(notice_of(FakeInfo(61_000, {"node9": [3, 2]})), 7, now=1.0)
    assert "node node9 (ranks [2, 3])" in line and "00:01:01 UTC (in 60 s)" in line
    assert "checkpoint at step 7" in line
    assert "no deadline given" in describe(notice_of(FakeInfo(None, {"x": []})), 1)
    assert notice_of(None) is None


class FakeHook:
    def __init__(self, saved=()):
        self._saved, self.calls = set(saved), []

    def save(self, step, engine, *, loader=None, extra=None):
        self.calls.append((step, extra))
        self._saved.add(step)
        return f"uri/step_{step:08d}"


def test_checkpoint_uses_the_hooks_save_once_per_step(capsys):
    poll = PreemptionPoll(FakeGetInfo(), every=1)
    hook = FakeHook(saved={10})
    assert poll.checkpoint(12, hook, "engine", "loader", lambda: {"k": 1}) == "uri/step_00000012"
    assert hook.calls == [(12, {"k": 1})]
    assert poll.checkpoint(10, hook, "engine", "loader", lambda: {}) is None   # periodic one
    assert poll.checkpoint(12, hook, "engine", "loader", lambda: {}) is None
    assert len(hook.calls) == 1

    class NoStore:   # checkpoint.uri null (NoCheckpoints has no save)
        pass
    assert poll.checkpoint(3, NoStore(), "e", "l", lambda: {}) is None
    assert "nothing saved" in capsys.readouterr().err


def test_config_keys():
    assert TrainConfig.__dataclass_fields__["preemption_poll_steps"].default == 10
    assert ResourcesConfig.__dataclass_fields__["max_preemptions"].default == -1
    assert isinstance(ExperimentConfig, type)


def test_driver_counts_notices_and_restarts_and_status_reads_them_back(capsys):
    from orchestration.commands.jobs import interruptions
    from orchestration.driver import _count

    counts = {"group_start": 0, "preemption": 0, "world_sizes": [], "notices": []}
    notice = {"nodes": ["n1"], "ranks": [1], "deadline_ms": None, "step": 30}
    for item in ({"group_start": 1.0, "world_size": 2}, {"preemption": notice},
                 {"group_start": 2.0, "world_size": 1}):
        _count(item, counts)
    assert counts == {"group_start": 2, "preemption": 1, "world_sizes": [2, 1],
                      "notices": [notice]}
    err = capsys.readouterr().err
    assert "preemption notice 1: node n1 (ranks [1])" in err and "checkpoint at step 30" in err
    assert "worker group restart 1: resuming from the newest checkpoint on 1 worker(s)" in err
    assert interruptions(err, {}) == {"restarts": 1, "preemptions": 1}   # a running job's tail
    assert interruptions("", {"restarts": 0, "preemptions": 2}) == {"restarts": 0,
                                                                    "preemptions": 2}
    assert interruptions("nothing", {}) == {"restarts": None, "preemptions": None}


def test_spot_profile_sets_max_preemptions_and_the_job_can_override_it():
    import json

    from cluster.profiles import config_overrides, load_profile
    from orchestration.commands.cluster import render_job

    assert config_overrides(load_profile("gke-8xh100-spot")) == ["resources.max_preemptions=20"]
    assert config_overrides(load_profile("gke-8xh100")) == []
    assert config_overrides(load_profile("local", ["job.max_preemptions=-1"])) == [
        "resources.max_preemptions=-1"]
    from pathlib import Path

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    bucket = ["checkpoint.uri=gs://bucket/smoke"]
    job = json.dumps(render_job("gke-8xh100-spot", smoke, 2, overrides=bucket)["rayjob.yaml"])
    assert "max_preemptions: 20" in job   # in the job's config (runtime_env)
    job = json.dumps(render_job("gke-8xh100-spot", smoke, 2,
                                overrides=[*bucket, "resources.max_preemptions=3"])["rayjob.yaml"])
    assert "max_preemptions: 3" in job
