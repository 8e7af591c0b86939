"""Fault injection on real runs: what survives, what is lost.

    python benchmarks/faults.py --json [--only NAME ...] [--keep]

Each scenario runs `pretrain run configs/smoke.yaml` (tiny synthetic data, 2 Ray workers,
ZeRO-2, log every step) against real servers started here on 127.0.0.1 (a GCS emulator that
keeps its objects on disk, so a restarted one serves them again; an `mlflow server`),
injects one fault and checks the outcome:

- survived: the run finished, or stopped with a clear message (exit code 2 and no Python
  traceback at the end of its output), as the scenario expects;
- data_lost: a checkpoint that was committed is gone or no longer verifies (other than the
  one the scenario corrupts on purpose), or an MLflow step of train/loss is missing or
  logged twice.

Faults: SIGKILL of a worker mid-step; SIGKILL of rank 0 while a step is uploading and while
it is being committed; the object store down for a while; the MLflow server down for a
while; SIGTERM at random steps then resume; same-size corruption of the newest checkpoint;
a truncated data shard; a second job on the same checkpoint URI; a full staging disk
(a 3 MB tmpfs: needs root and mount; reported as not tried otherwise).

Prints one row per scenario and the totals (tried / survived / data_lost). Takes ~15 minutes
on 2 CPU cores. The tests cover each mechanism at unit level (tests/test_checkpoints_faults.py,
tests/test_resume_run.py); this is the end-to-end count the README's table shows.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import print_result  # noqa: E402
from tests.fixtures.net import free_port  # noqa: E402
from tests.fixtures.pretrain_run import Run, overrides  # noqa: E402
from tests.fixtures.servers import gcs_emulator_process, mlflow_server_process  # noqa: E402


@dataclass
class Outcome:
    name: str
    tried: bool
    survived: bool
    data_lost: bool
    detail: str
    seconds: float = 0.0


class Bench:
    """The servers and the shared tiny dataset of one benchmark run."""

    def __init__(self, root: Path, gcs_url: str, mlflow_url: str):
        self.root, self.gcs_url, self.mlflow_url = root, gcs_url, mlflow_url
        self.data = root / "data"

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def bucket(self) -> str:
        from pretrain import storage

        name = f"faults-{uuid.uuid4().hex[:8]}"
        fs = storage.emulator_filesystem(self.gcs_url, project="test")
        fs.mkdir(name)
        return f"gs://{name}"

    def run(self, where: Path, steps: int, every: int, uri: str, *extra: str,
            tracking: str | None = None, data: Path | None = None) -> Run:
        return Run(where, *overrides(data or self.data, steps, every, f"checkpoint.uri={uri}",
                                     f"tracking.tracking_uri={tracking or self.mlflow_url}",
                                     "checkpoint.preempt_grace_s=60", *extra))


# ---------------------------------------------------------------------------------------
# What a run left behind


def committed_steps(uri: str) -> dict[int, bool]:
    """step -> whether it verifies, for every committed checkpoint under `uri`."""
    from checkpoints.discovery import list_checkpoints

    return {c.step: c.loadable for c in list_checkpoints(uri) if c.committed}


def logged_steps(tracking: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking).get_metric_history(run_id, "train/loss"))


def step_problems(steps: list[int], last: int) -> str:
    """'' when train/loss was logged exactly once at every step 1..last."""
    if steps == list(range(1, last + 1)):
        return ""
    doubled = sorted({s for s in steps if steps.count(s) > 1})
    missing = sorted(set(range(1, last + 1)) - set(steps))
    return f"MLflow steps missing {missing[:10]} doubled {doubled[:10]}"


def lost_checkpoints(before: dict[int, bool], after: dict[int, bool],
                     corrupted: set[int] = frozenset()) -> str:
    """'' unless a checkpoint committed and good in `before` is gone or bad in `after`, when
    retention did not remove it on purpose (retention keeps the newest ones: only steps at
    least as new as the oldest one still there are compared)."""
    if not after:
        return "no committed checkpoint left" if before else ""
    oldest_kept = min(after)
    bad = [s for s, ok in before.items()
           if ok and s >= oldest_kept and s not in corrupted and not after.get(s, False)]
    return f"committed checkpoints lost or corrupt: {bad}" if bad else ""


def clear_stop(run: Run) -> bool:
    """A stop that tells the operator what happened: exit 2, no traceback at the end."""
    tail = "\n".join(run.stderr().splitlines()[-40:])
    return run.proc.returncode == 2 and "Traceback" not in tail


def stop_message(run: Run) -> str:
    """The paragraph the run stopped with (the console wraps it), on one line."""
    lines = run.stderr().strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    return " ".join(line.strip() for line in lines[starts[-1]:]) if starts else (lines or [""])[-1]


def wait_until(check: Callable[[], bool], run: Run, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if run.proc.poll() is not None:
            raise RuntimeError(f"run exited {run.proc.returncode} before {what}:\n"
                               f"{run.stderr()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def newest_step(uri: str) -> int:
    steps = committed_steps(uri)
    return max(steps) if steps else 0




# ---------------------------------------------------------------------------------------
# Scenarios: each returns (survived, data_lost, detail)


def sigkill_worker(b: Bench) -> tuple[bool, bool, str]:
    where, uri = b.folder("sigkill_worker"), b.bucket() + "/run"
    run = b.run(where, 400, 2, uri, "resources.max_failures=1", "checkpoint.stop_after_step=30")
    wait_until(lambda: newest_step(uri) >= 4, run, 240, "a committed checkpoint")
    before = committed_steps(uri)
    workers = run.train_workers()
    os.kill(workers[-1], signal.SIGKILL)          # mid-step: the loop never pauses
    out = run.finish(timeout=600)
    lost = step_problems(logged_steps(b.mlflow_url, out["mlflow_run_id"]), out["steps"]) or \
        lost_checkpoints(before, committed_steps(uri))
    return out["steps"] == 30, bool(lost), lost or f"resumed from step {out['resumed_from_step']}"


def _kill_rank0_when(b: Bench, name: str, moment: Callable[[object, str], bool]) -> tuple[bool, bool, str]:
    """SIGKILL rank 0 at the first `moment(fs, step_folder)` of a step folder that has no
    COMMIT.json yet (upload in flight / rank markers written), then let Ray restart it."""
    from checkpoints.discovery import step_folders
    from checkpoints.layout import MANIFEST

    where, uri = b.folder(name), b.bucket() + "/run"
    run = b.run(where, 400, 3, uri, "resources.max_failures=1", "checkpoint.stop_after_step=36")
    wait_until(lambda: newest_step(uri) >= 3, run, 240, "a first committed checkpoint")
    before = committed_steps(uri)
    hit = []

    def in_window() -> bool:
        fs, folders = step_folders(uri)
        for folder in folders:
            # paths inside the step folder, e.g. "markers/rank_00000.json"
            names = {p[len(folder.rstrip("/")) + 1:] for p in fs.find(folder)}
            if MANIFEST not in names and moment(names, folder):
                hit.append(folder)
                return True
        return False

    try:
        wait_until(in_window, run, 240, "the fault window")
    except RuntimeError as e:
        run.proc.kill()
        return False, False, f"window never seen: {e}"
    try:
        pid = run.rank0_pid()
    except AssertionError:
        run.proc.kill()
        return False, False, "rank 0's pid not found in the run's log"
    os.kill(pid, signal.SIGKILL)
    before.update({s: ok for s, ok in committed_steps(uri).items() if s not in before})
    out = run.finish(timeout=600)
    lost = step_problems(logged_steps(b.mlflow_url, out["mlflow_run_id"]), out["steps"]) or \
        lost_checkpoints(before, committed_steps(uri))
    return (out["steps"] == 36, bool(lost),
            lost or f"killed at {hit[0].rsplit('/', 1)[-1]}, resumed from {out['resumed_from_step']}")


def sigkill_rank0_during_upload(b: Bench) -> tuple[bool, bool, str]:
    return _kill_rank0_when(b, "sigkill_rank0_during_upload",
                            lambda names, _: names and not any(n.startswith("markers/")
                                                               for n in names))


def sigkill_rank0_during_commit(b: Bench) -> tuple[bool, bool, str]:
    from checkpoints.layout import marker_name

    return _kill_rank0_when(b, "sigkill_rank0_during_commit",
                            lambda names, _: {marker_name(0), marker_name(1)} <= names)


def object_store_down(b: Bench) -> tuple[bool, bool, str]:
    """The GCS emulator stopped for 20 s mid-run (uploads fail and retry), then back."""
    where = b.folder("object_store_down")
    data_dir = b.folder("object_store_down/gcs")
    port = free_port()
    with gcs_emulator_process(port, data_dir) as (url, proc):
        bench_gcs = b.gcs_url
        b.gcs_url = url
        os.environ["STORAGE_EMULATOR_HOST"] = url
        uri = b.bucket() + "/run"
        run = b.run(where, 400, 2, uri, "checkpoint.stop_after_step=40",
                    "checkpoint.upload_retries=8")
        wait_until(lambda: newest_step(uri) >= 4, run, 240, "a committed checkpoint")
        before = committed_steps(uri)
    # the emulator is down here (the context stopped it)
    time.sleep(20)
    with gcs_emulator_process(port, data_dir):
        out_or_none = None
        try:
            out_or_none = run.finish(timeout=600)
        except AssertionError:
            pass
        after = committed_steps(uri)
    os.environ["STORAGE_EMULATOR_HOST"] = b.gcs_url = bench_gcs
    if out_or_none is None:
        return clear_stop(run), bool(lost_checkpoints(before, after)), \
            "stopped: " + run.stderr().strip().splitlines()[-1][:200]
    lost = step_problems(logged_steps(b.mlflow_url, out_or_none["mlflow_run_id"]),
                         out_or_none["steps"]) or lost_checkpoints(before, after)
    newest = max(after) if after else None
    return (out_or_none["steps"] == 40 and newest == 40, bool(lost),
            lost or f"finished; newest committed step {newest}")


def mlflow_down(b: Bench) -> tuple[bool, bool, str]:
    """The MLflow server stopped for 20 s mid-run, then back on the same port and store."""
    where = b.folder("mlflow_down")
    root = b.folder("mlflow_down/mlflow")
    port = free_port()
    uri = str(where / "ckpt")
    with mlflow_server_process(root, port, start_timeout=300) as (tracking, _):
        run = b.run(where, 400, 5, uri, "checkpoint.stop_after_step=60", tracking=tracking)
        run.wait_for("step 10/400", timeout=240)
    time.sleep(20)
    with mlflow_server_process(root, port, start_timeout=300) as (tracking, _):
        try:
            out = run.finish(timeout=600)
        except AssertionError:
            return clear_stop(run), False, "stopped: " + run.stderr().strip().splitlines()[-1][:200]
        lost = step_problems(logged_steps(tracking, out["mlflow_run_id"]), out["steps"])
    return out["steps"] == 60, bool(lost), lost or "finished, every step logged once"


def sigterm_random_steps(b: Bench) -> tuple[bool, bool, str]:
    """SIGTERM `pretrain run` at three random steps; each time resume; 30 steps in the end."""
    where, uri = b.folder("sigterm_random_steps"), str(b.folder("sigterm_random_steps") / "ckpt")
    rng = random.Random(0)
    at = sorted(rng.sample(range(3, 28), 3))
    stops, before = [], {}
    for k in at:
        run = b.run(where, 30, 1000, uri)
        # step k or later: a resumed run starts after its stop step, which may be past k
        try:
            run.wait_for_true(lambda: max(map(int, re.findall(r"^step (\d+)/30 ", run.stderr(),
                                                             re.M)), default=0) >= k,
                              300, f"step {k}/30 or later")
            run.proc.send_signal(signal.SIGTERM)
        except AssertionError:
            if run.proc.poll() is None:
                raise   # neither there nor finished in time
        out = run.finish(timeout=120)
        stops.append(out["steps"])
        before.update(committed_steps(uri))
        if out["steps"] >= 30:
            break
    out = b.run(where, 30, 1000, uri).finish(timeout=600)
    lost = step_problems(logged_steps(b.mlflow_url, out["mlflow_run_id"]), 30) or \
        lost_checkpoints(before, committed_steps(uri))
    return out["steps"] == 30, bool(lost), lost or f"stopped at {stops}, finished at 30"


def corrupt_newest_checkpoint(b: Bench) -> tuple[bool, bool, str]:
    """Flip bytes (same size) in the newest checkpoint; the resume uses the one before."""
    where = b.folder("corrupt_newest_checkpoint")
    uri = str(where / "ckpt")
    first = b.run(where, 8, 2, uri).finish(timeout=600)
    steps = committed_steps(uri)
    newest = max(steps)
    files = sorted((p for p in (where / "ckpt" / f"step_{newest:08d}").rglob("*")
                    if p.is_file() and p.stat().st_size > 4096), key=lambda p: -p.stat().st_size)
    with open(files[0], "r+b") as f:
        f.seek(files[0].stat().st_size // 2)
        data = f.read(64)
        f.seek(files[0].stat().st_size // 2)
        f.write(bytes(x ^ 0xFF for x in data))
    out = b.run(where, 12, 2, uri).finish(timeout=600)
    lost = lost_checkpoints(steps, committed_steps(uri), corrupted={newest})
    # the steps after the fallback point are trained again and logged again: MLflow keeps
    # one value per step only if the resume does not re-log them (checked as usual)
    lost = lost or step_problems(logged_steps(b.mlflow_url, out["mlflow_run_id"]), 12)
    ok = out["steps"] == 12 and out["resumed_from_step"] == newest - 2 \
        and out["mlflow_run_id"] == first["mlflow_run_id"]
    return ok, bool(lost), lost or f"corrupted step {newest}, resumed from {out['resumed_from_step']}"


def truncated_shard(b: Bench) -> tuple[bool, bool, str]:
    """One video training shard cut to half its size."""
    import shutil

    where = b.folder("truncated_shard")
    data = where / "data"
    shutil.copytree(b.data, data)
    shards = sorted((data / "video" / "train").rglob("*.mds"))
    victim = shards[len(shards) // 2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    run = b.run(where, 40, 1000, str(where / "ckpt"), data=data)
    try:
        out = run.finish(timeout=600)
    except AssertionError:
        return clear_stop(run), False, "stopped: " + run.stderr().strip().splitlines()[-1][:200]
    skipped = out["metrics"].get("data/skipped_samples", 0)
    return (out["steps"] == 40 and skipped > 0, False,
            f"finished, data/skipped_samples={skipped} ({victim.name} of {len(shards)})")


def two_jobs_one_uri(b: Bench) -> tuple[bool, bool, str]:
    """A second job on a URI the first one is writing: refused; the first is untouched.
    The first runs until it is told to stop (SIGTERM after the second ended), so the
    second always meets a live holder however slowly it starts."""
    where, uri = b.folder("two_jobs_one_uri"), b.bucket() + "/run"
    first = b.run(where / "a", 4000, 2, uri)
    wait_until(lambda: newest_step(uri) >= 4, first, 240, "the first job's checkpoint")
    second = b.run(where / "b", 4000, 2, uri)
    try:
        second.finish(code=2, timeout=300)
        refused = "lease" in second.stderr().lower()
    except (AssertionError, subprocess.TimeoutExpired):
        second.proc.kill()
        refused = False
    before = committed_steps(uri)
    first.proc.send_signal(signal.SIGTERM)
    out = first.finish(timeout=300)
    lost = step_problems(logged_steps(b.mlflow_url, out["mlflow_run_id"]), out["steps"]) or \
        lost_checkpoints(before, committed_steps(uri))
    last = second.stderr().strip().splitlines()[-1][:160] if second.stderr().strip() else ""
    return (refused and clear_stop(second) and out["stopped"], bool(lost),
            lost or (f"second job refused: {last}" if refused else f"second job NOT refused: {last}"))


def staging_disk_full(b: Bench) -> tuple[bool, bool, str] | None:
    """checkpoint.local_dir on a 3 MB tmpfs: the first save does not fit. The URI is the
    bucket's and the snapshot goes through the disk (snapshot_in_memory=false): a local URI
    stages next to itself and an in-memory snapshot never touches local_dir."""
    where = b.folder("staging_disk_full")
    small = where / "small"
    small.mkdir(exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        return None
    try:
        uri = b.bucket() + "/staging"
        run = b.run(where, 40, 4, uri, f"checkpoint.local_dir={small}",
                    "checkpoint.snapshot_in_memory=false")
        try:
            out = run.finish(timeout=600)
            return False, False, f"finished {out['steps']} steps without a word about the disk"
        except AssertionError:
            pass
        bad = [s for s, ok in committed_steps(uri).items() if not ok]
        error = stop_message(run)
        return (clear_stop(run) and str(small) in error, bool(bad), f"stopped: {error[:300]}")
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


SCENARIOS: dict[str, Callable[[Bench], tuple[bool, bool, str] | None]] = {
    "sigkill_worker": sigkill_worker,
    "sigkill_rank0_during_upload": sigkill_rank0_during_upload,
    "sigkill_rank0_during_commit": sigkill_rank0_during_commit,
    "object_store_down": object_store_down,
    "mlflow_down": mlflow_down,
    "sigterm_random_steps": sigterm_random_steps,
    "corrupt_newest_checkpoint": corrupt_newest_checkpoint,
    "truncated_shard": truncated_shard,
    "two_jobs_one_uri": two_jobs_one_uri,
    "staging_disk_full": staging_disk_full,
}


def prepare_data(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "orchestration.cli", "prepare", "synthetic",
                    "--out", str(root), "--videos", "64", "--images", "32", "--frames", "20",
                    "--size", "32", "--no-progress"], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    outcomes: list[Outcome] = []
    with gcs_emulator_process() as (gcs_url, _), \
            mlflow_server_process(Path(tempfile.mkdtemp(dir=work)), start_timeout=300) as (mlflow_url, _):
        os.environ["STORAGE_EMULATOR_HOST"] = gcs_url
        bench = Bench(work, gcs_url, mlflow_url)
        prepare_data(bench.data)
        for name in names:
            t0 = time.monotonic()
            try:
                result = SCENARIOS[name](bench)
            except Exception as e:     # the harness failed, not necessarily the system
                result = (False, False, f"harness error: {type(e).__name__}: {str(e)[:300]}")
            if result is None:
                outcome = Outcome(name, False, False, False, "not tried (needs mount)")
            else:
                outcome = Outcome(name, True, *result)
            outcome.seconds = round(time.monotonic() - t0, 1)
            outcomes.append(outcome)
            if not args.json:
                print(f"{name:>30}: {'survived' if outcome.survived else 'FAILED'}"
                      f"{' DATA LOST' if outcome.data_lost else ''}  {outcome.detail}",
                      file=sys.stderr, flush=True)
    tried = [o for o in outcomes if o.tried]
    result = {"tried": len(tried), "survived": sum(o.survived for o in tried),
              "data_lost": sum(o.data_lost for o in tried),
              "scenarios": [asdict(o) for o in outcomes]}
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    print_result(result, args.json)
    return 0 if result["survived"] == result["tried"] and not result["data_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
