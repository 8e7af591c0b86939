"""The `pretrain` program ends without Python's teardown (orchestration.cli.exit_now), but
does everything else an exit does: other threads finish, exit handlers run, the streams are
flushed, the exit status is the verb's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r'''
import atexit, sys, threading, time
from pathlib import Path
from orchestration.cli import exit_now

out = Path(sys.argv[1])

def late_writer():        # a non-daemon thread still working when the program returns
    time.sleep(0.5)
    out.write_text("thread finished")

threading.Thread(target=late_writer).start()
atexit.register(lambda: print("exit handler ran"))
print("buffered line, no newline flush", end="")
sys.stderr.write("stderr text")
exit_now(3)
'''


def test_exit_now_keeps_what_an_exit_does(tmp_path):
    marker = tmp_path / "marker.txt"
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(marker)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered line, no newline flushexit handler ran\n"
    assert proc.stderr == "stderr text"
    assert marker.read_text() == "thread finished"


def test_the_program_returns_the_verbs_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "run", str(tmp_path / "none.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: config file" in proc.stderr
