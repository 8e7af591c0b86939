"""The drain-notice poll's cadence and reactions, fast: `get_preemption_info` here is a FAKE
(a plain function standing in for `ray.train.get_preemption_info`, which only works inside
a Ray Train worker); tests/test_preemption_drain.py drains a real node."""
from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.train.config import ExperimentConfig, ResourcesConfig, TrainConfig
from pretrain.train.preemption_poll import (PreemptionPoll, describe, notice_of,
                                            ray_train_preemption_info)


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


def test_not_under_ray_train_no_function(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert ray_train_preemption_info() is None


def test_config_keys():
    assert TrainConfig.__dataclass_fields__["preemption_poll_steps"].default == 10
    assert ResourcesConfig.__dataclass_fields__["max_preemptions"].default == -1
    assert isinstance(ExperimentConfig, type)
