"""Node-drain notices under Ray Train: a checkpoint before the node goes, then train on.

Ray 2.60 tells the workers that a node of theirs is being drained (a spot reclaim, a
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`) and by when, through
`ray.train.get_preemption_info()` (alpha). That call is a barrier across all workers (rank
0's answer is broadcast): every rank has to call it the same number of times, so it is
asked only every `train.preemption_poll_steps` optimizer steps, at the same steps on every
rank, and only under Ray Train (the driver passes the function in; the torchrun path passes
nothing and never polls).

On a new notice (one per drained node set and deadline) every rank saves a checkpoint at
that step through the checkpoint hook's own save (the one the periodic and the final
checkpoints use; its upload and commit run in the background) and training goes on, as
Ray recommends: when the node really goes, Ray Train restarts the worker group
(FailureConfig.max_preemption_failures, our resources.max_preemptions) and it resumes
from that checkpoint. Rank 0 prints one line naming the node(s) and the deadline and
reports {"preemption": {...}} to the driver, which prints it and counts the notices.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

GetInfo = Callable[[], Any]   # ray.train.get_preemption_info: None or a PreemptionInfo


def notice_of(info: Any) -> dict[str, Any] | None:
    """A PreemptionInfo as a plain dict: nodes, ranks, deadline (epoch ms or None)."""
    if info is None:
        return None
    nodes = dict(getattr(info, "preempted_node_to_ranks", {}) or {})
    return {"nodes": sorted(nodes),
            "ranks": sorted({r for ranks in nodes.values() for r in ranks}),
            "deadline_ms": getattr(info, "deadline_ms", None)}


def describe(notice: dict[str, Any], step: int, now: float | None = None,
             prefix: str = "preemption notice") -> str:
    """The one console line of a notice."""
    now = time.time() if now is None else now
    nodes = ", ".join(notice["nodes"]) or "?"
    if notice.get("deadline_ms"):
        at = notice["deadline_ms"] / 1000.0
        when = (time.strftime("%H:%M:%S UTC", time.gmtime(at))
                + f" (in {max(at - now, 0.0):.0f} s)")
    else:
        when = "no deadline given"
    return (f"{prefix}: node {nodes} (ranks {notice['ranks']}) is being drained, "
            f"deadline {when}: checkpoint at step {step}, training goes on")


class PreemptionPoll:
    """Asks `get_info` every `every` steps (collective: same steps on every rank); returns
    the notice dict at the step a new one arrives, else None."""

    def __init__(self, get_info: GetInfo | None, every: int, rank: int = 0,
                 report: Callable[[dict], None] | None = None):
        self.get_info = get_info if every > 0 else None
        self.every, self.rank, self.report = every, rank, report
        self.seen: set[tuple] = set()
        self.notices: list[dict[str, Any]] = []   # every new notice, with its step
        self.polls = 0

    def __call__(self, step: int) -> dict[str, Any] | None:
        if self.get_info is None or step % self.every:
            return None
        self.polls += 1
        notice = notice_of(self.get_info())
        if notice is None:
            return None
        key = (tuple(notice["nodes"]), notice["deadline_ms"])
        if key in self.seen:
            return None
        self.seen.add(key)
        notice["step"] = step
        self.notices.append(notice)
        if self.rank == 0:   # one line per notice: the driver's when it gets the report
            if self.report is not None:
                self.report({"preemption": dict(notice)})
            else:
                print(describe(notice, step), file=sys.stderr, flush=True)
        return notice

    def checkpoint(self, step: int, hook, engine, loader,
                   extra_state: Callable[[], dict[str, Any]]) -> str | None:
        """Save `step` now through the hook's save (collective), unless the periodic save
        just wrote it or there is no checkpoint store. Returns the URI it will commit as."""
        save = getattr(hook, "save", None)
        if save is None:   # checkpoint.uri is null: nothing to save to
            if self.rank == 0:
                print("preemption notice: checkpoint.uri is null, nothing saved",
                      file=sys.stderr, flush=True)
            return None
        if step in (getattr(hook, "_saved", None) or ()):
            return None
        return save(step, engine, loader=loader, extra=extra_state())

