"""The console of `pretrain run` (issue 15 §2): progress, evaluations, our notes and the
summary on the terminal; Ray's, the workers' and the libraries' output in the run's log file,
which the summary names; `--verbose` shows it all. And the noise whose cause was ours is gone
at its source: streaming's `predownload` notice, torch's FutureWarning for the deprecated
`all_gather_into_tensor` that DeepSpeed's gathers went through.

Fast: the routing by writer (orchestration/console.py) in the driver and in a worker, the
log file's place, the predownload window, the all-gather. Slow: the session's six-step run
(tests/fixtures/pretrain_run.py), read for what its console and log hold.
"""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestration import console as con

ROOT = Path(__file__).resolve().parents[1]


def module(name: str, source: str) -> dict:
    """Run `source` as the body of a module named `name`; returns its namespace."""
    ns = {"__name__": name, "sys": sys, "logging": logging, "warnings": warnings}
    exec(compile(source, f"<{name}>", "exec"), ns)
    return ns


OURS = module("pretrain.fake", """
def say(text, stream=None):
    print(text, file=stream or sys.stderr)

def log(text, level=logging.WARNING):
    logging.getLogger("checkpoints").log(level, text)
""")
THEIRS = module("ray.fake", """
def say(text, stream=None):
    print(text, file=stream or sys.stderr)

def fail():
    raise ValueError("boom")
""")


# -- who wrote it -----------------------------------------------------------------------


def test_writer_is_the_first_frame_outside_the_logging_machinery():
    assert con.is_ours(sys._getframe()) is False                # this test module: not ours
    frames = module("orchestration.fake", "import sys\ndef f(): return sys._getframe()")
    assert con.is_ours(frames["f"]()) is True
    main = module("__main__", "import sys\ndef f(): return sys._getframe()")
    main["__spec__"] = SimpleNamespace(name="orchestration.cli")   # python -m orchestration.cli
    assert con.is_ours(main["f"]()) is True
    assert con.is_ours(None) is None


def test_routed_stream_splits_by_writer():
    ours, theirs = [], []
    stream = con.RoutedStream(io.StringIO(), ours.append, theirs.append)
    OURS["say"]("step 1/10", stream)
    THEIRS["say"]("(TrainController pid=1) Requesting resources", stream)
    assert "".join(ours) == "step 1/10\n" and "".join(theirs).startswith("(TrainController")
    assert stream.getvalue() == ""   # attributes are the wrapped stream's


def test_a_stream_wrapper_around_ours_keeps_the_writer():
    """ray.init has colorama wrap sys.stdout/sys.stderr (ours included) when they are not
    a terminal: a write through it is still its caller's."""
    wrapper = module("colorama.ansitowin32", """
class StreamWrapper:
    def __init__(self, wrapped):
        self.wrapped = wrapped
    def write(self, text):
        self.wrapped.write(text)
""")
    ours, theirs = [], []
    stream = wrapper["StreamWrapper"](con.RoutedStream(io.StringIO(), ours.append, theirs.append))
    OURS["say"]("step 2/10", stream)
    THEIRS["say"]("Token authentication is enabled", stream)
    assert "".join(ours) == "step 2/10\n" and "Token" in "".join(theirs)


def test_a_replaced_print_keeps_the_writer(monkeypatch):
    """Ray's tqdm support replaces builtins.print in the driver once it forwards a worker
    line (Ray Train does in its workers): a print through it is still its caller's."""
    import builtins

    patched = module("ray.experimental.tqdm_ray", """
import builtins
_print = builtins.print
def safe_print(*args, **kwargs):
    _print(*args, **kwargs)
""")
    monkeypatch.setattr(builtins, "print", patched["safe_print"])
    ours, theirs = [], []
    stream = con.RoutedStream(io.StringIO(), ours.append, theirs.append)
    OURS["say"]("step 3/10", stream)
    THEIRS["say"]("Started training worker group", stream)
    monkeypatch.undo()
    assert "".join(ours) == "step 3/10\n" and "Started" in "".join(theirs)


def test_driver_console_shows_ours_and_logs_everything(tmp_path, capsys):
    ckpt = logging.getLogger("checkpoints")
    with con.Console() as c:
        handler = logging.StreamHandler()   # as logging.lastResort: the current sys.stderr
        ckpt.addHandler(handler)
        OURS["say"]("note: before the log is open")
        THEIRS["say"]("INFO mlflow: Creating initial MLflow database tables")
        path = c.open_log(str(tmp_path / "logs" / "run.log"))
        THEIRS["say"]("\x1b[36m(RayTrainWorker pid=7)\x1b[0m No CUDA runtime is found")
        OURS["say"]("step 5/10  loss 1.0")
        OURS["log"]("checkpoint step 4 cannot be resumed from")   # a record of ours
        ckpt.removeHandler(handler)
        OURS["say"]("summary line", sys.stdout)
        c.show("committed checkpoint step 10\ncommitted checkpoint step 10")   # a worker's
    out, err = capsys.readouterr()
    assert err.splitlines() == ["note: before the log is open", "step 5/10  loss 1.0",
                                "checkpoint step 4 cannot be resumed from",
                                "committed checkpoint step 10"]
    assert out == "summary line\n"
    log = Path(path).read_text()
    for line in ("note: before the log is open", "Creating initial MLflow database tables",
                 "(RayTrainWorker pid=7) No CUDA runtime is found",
                 "step 5/10",
                 "summary line"):
        assert line in log, line
    assert "\x1b[" not in log          # no colour codes in the file
    assert "committed checkpoint" not in log   # the log has a worker's lines from Ray's copy
    assert not isinstance(sys.stderr, con.RoutedStream)   # restored


def test_verbose_shows_everything(tmp_path, capsys):
    with con.Console(verbose=True) as c:
        c.open_log(str(tmp_path / "v.log"))
        THEIRS["say"]("(TrainController pid=1) Started training worker group")
        OURS["say"]("step 1/2")
    err = capsys.readouterr().err
    assert "Started training worker group" in err and "step 1/2" in err
    assert "Started training worker group" in (tmp_path / "v.log").read_text()


def test_an_error_names_the_log_and_a_traceback_reaches_the_console(tmp_path, capsys):
    with pytest.raises(RuntimeError):
        with con.Console() as c:
            c.open_log(str(tmp_path / "e.log"))
            raise RuntimeError("worker died")
    assert f"full output is in {tmp_path / 'e.log'}" in capsys.readouterr().err
    # writes with no writer of any module (a thread's uncaught exception) are ours: never hidden
    import threading

    hook, threading.excepthook = threading.excepthook, threading.__excepthook__  # not pytest's
    try:
        with con.Console() as c:
            c.open_log(str(tmp_path / "t.log"))
            t = threading.Thread(target=THEIRS["fail"])
            t.start()
            t.join()
    finally:
        threading.excepthook = hook
    assert "ValueError: boom" in capsys.readouterr().err


def test_logging_handlers_bound_to_the_terminal_are_routed_too(tmp_path, capsys):
    lib = logging.getLogger("somelib")
    handler = logging.StreamHandler(sys.stderr)   # bound before the console is installed
    lib.addHandler(handler)
    lib.propagate = False
    try:
        with con.Console() as c:
            c.open_log(str(tmp_path / "h.log"))
            lib.warning("library chatter")
        assert handler.stream is sys.stderr
    finally:
        lib.removeHandler(handler)
        lib.propagate = True
    assert "library chatter" not in capsys.readouterr().err
    assert "library chatter" in (tmp_path / "h.log").read_text()


# -- a worker's half ----------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_worker_console_sends_our_lines_and_keeps_everything(rank, capsys):
    sent: list[list[str]] = []
    waited = []
    logger = logging.getLogger("checkpoints")
    level = logger.level
    logger.setLevel(logging.INFO)   # as Ray's worker logging has it
    try:
        with con.WorkerConsole(lambda b: sent.append(b) or len(sent), rank, wait=waited.append):
            OURS["say"]("resumed from /ck/step_00000003 at step 3")
            THEIRS["say"]("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
            OURS["log"]("committed checkpoint step 4 (5 files, 8.1 MB)", logging.INFO)
            OURS["log"]("could not renew the lease")
            sys.stderr.write("partial ")
            OURS["say"]("line")   # a print in two writes, from our code
    finally:
        logger.setLevel(level)
    lines = [ln for batch in sent for ln in batch]
    expected = ["resumed from /ck/step_00000003 at step 3"]
    if rank == 0:
        expected.append("committed checkpoint step 4 (5 files, 8.1 MB)")
    expected += ["could not renew the lease", "line"]
    assert lines == expected
    assert waited == [len(sent)]   # the last batch was waited for
    err = capsys.readouterr().err   # the worker's own stream keeps everything
    assert "built successfully" in err and "resumed from" in err


# -- where the log goes -------------------------------------------------------------------


def test_the_log_lives_in_the_run_folder(tmp_path, monkeypatch):
    from orchestration.commands.run import log_path

    monkeypatch.chdir(tmp_path)
    local = SimpleNamespace(checkpoint=SimpleNamespace(uri="runs/smoke/checkpoints"))
    assert log_path(local, "configs/smoke.yaml", "smoke-1") == \
        str(tmp_path / "runs" / "smoke" / "logs" / "smoke-1.log")
    bucket = SimpleNamespace(checkpoint=SimpleNamespace(uri="gs://b/run/ck"))
    assert log_path(bucket, "configs/smoke.yaml", "smoke-1") == \
        str(tmp_path / "runs" / "smoke" / "logs" / "smoke-1.log")
    none = SimpleNamespace(checkpoint=SimpleNamespace(uri=""))
    assert log_path(none, "x/big.yaml", "big-2").endswith("/runs/big/logs/big-2.log")


# -- causes fixed at the source ----------------------------------------------------------


def test_predownload_is_always_passed():
    from pretrain.data.loader import WHOLE_EPOCH, predownload_window

    assert predownload_window("gs://bucket/video", 16) == 128
    assert predownload_window("gs://bucket/video", 2) == 64
    assert predownload_window("/data/video", 16) == WHOLE_EPOCH


def test_deepspeed_gathers_without_the_deprecated_collective(tmp_path):
    """deepspeed.comm's all-gather, after gather_with_all_gather_single, warns nothing and
    gathers the same (one gloo process)."""
    code = f"""
import os, warnings, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
import deepspeed.comm as ds
ds.init_distributed(dist_backend="gloo", dist_init_required=False, verbose=False)
from pretrain.train.engine import gather_with_all_gather_single
def gather():
    out = torch.zeros(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds.all_gather_into_tensor(out, torch.tensor([1., 2., 3.]))
    return out.tolist(), [str(x.message) for x in w if "all_gather" in str(x.message)]
before = gather()
gather_with_all_gather_single()
after = gather()
print(before[0] == after[0] == [1., 2., 3.], bool(before[1]), after[1])
"""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same, warned_before, warned_after = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert same == "True" and warned_after == "[]"
    assert warned_before in ("True", "False")   # True while DeepSpeed picks the old name


# -- one real run -------------------------------------------------------------------------

NOISE = ["core_worker.cc", "PreemptionWatcher", "No CUDA runtime is found", "FutureWarning",
         "all_gather_into_tensor", "predownload", "built successfully", "TrainController",
         "RayTrainWorker", "Token authentication", "INFO mlflow", "Traceback"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_run_has_a_quiet_console(six_steps):
    where, run, summary = six_steps
    err = run.stderr()
    out = run.out.read_text()
    for noise in NOISE:
        assert noise not in err, f"{noise!r} on the console:\n{err}"
    assert re.search(r"^step 6/6  loss [0-9.]+  [0-9.]+ samples/s  eta", err, re.M), err
    assert "committed checkpoint step 6" in err   # a worker's line of ours
    log = Path(summary["log"])
    assert log.parent == where / "runs" / "q" / "logs" and log.is_file()
    assert f"log: {log}" in err and f"  log {log}" in out   # named on the console and in the summary
    text = log.read_text()
    assert "(RayTrainWorker pid=" in text and "world_rank=0" in text   # the workers' output
    assert "step 6/6" in text and "finished 6/6 steps" in text
    # causes that were ours: gone from the log as well
    assert "predownload" not in text and "all_gather_into_tensor" not in text
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= 12, err
