"""Two jobs whose datasets start at the same moment on one machine get different streaming
block prefixes (pretrain/data/shared_memory.py: the node's leader holds a lock while its
ranks choose one). Streaming alone lets both pick the lowest free prefix; the second then
fails creating it. The window between the scan and the creation is widened here (a sleep
after the scan) so the two processes always overlap in it."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OPEN_DATASET = r'''
import sys, time
import streaming.base.shared.prefix as prefix

scan = prefix._check_and_find_retrying
def slow_scan(*args, **kwargs):   # the race window, widened
    found = scan(*args, **kwargs)
    time.sleep(0.3)
    return found
prefix._check_and_find_retrying = slow_scan

from pathlib import Path

folder, locked, go = sys.argv[1], sys.argv[2] == "locked", Path(sys.argv[3])
if locked:
    from pretrain.data import shared_memory
    shared_memory.install()
from streaming import StreamingDataset

Path(folder + ".ready").touch()
while not go.exists():             # both processes imported: start together
    time.sleep(0.01)
try:
    ds = StreamingDataset(local=folder, batch_size=1)
except FileExistsError as exc:
    print("FileExistsError", exc)
    sys.exit(3)
print("prefix", ds._shm_prefix_int, flush=True)
time.sleep(1.5)                    # keep the blocks while the other one may still scan
'''


def _dataset(folder: Path) -> str:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"x": "int"}) as writer:
        for i in range(4):
            writer.write({"x": i})
    return str(folder)


def _open_together(folders: list[str], locked: bool, go: Path) -> list[subprocess.CompletedProcess]:
    for folder in folders:
        Path(folder + ".ready").unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_DATASET, folder,
                               "locked" if locked else "plain", str(go)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for folder in folders]
    deadline = time.monotonic() + 120
    while not all(Path(folder + ".ready").exists() for folder in folders):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


@pytest.mark.slow   # four processes importing streaming, one pair after the other: ~30 s
def test_datasets_opened_together_get_different_prefixes(tmp_path):
    folders = [_dataset(tmp_path / name) for name in ("a", "b")]

    # control: streaming alone, both scan before either creates: one of them fails
    plain = _open_together(folders, locked=False, go=tmp_path / "go-plain")
    assert sorted(p.returncode for p in plain) == [0, 3], [(p.stdout, p.stderr[-2000:]) for p in plain]

    locked = _open_together(folders, locked=True, go=tmp_path / "go-locked")
    assert [p.returncode for p in locked] == [0, 0], [p.stderr[-2000:] for p in locked]
    prefixes = {p.stdout.split()[-1] for p in locked}
    assert len(prefixes) == 2, [p.stdout for p in locked]
