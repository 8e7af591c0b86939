"""The console of `pretrain run`: our lines on the terminal, everything in the run's log file.

A training run's processes print a lot that a user of `pretrain run` does not need to see:
Ray's own log lines (its controller, its actors, E-level core-worker messages), torch and
DeepSpeed notices, library warnings. What the console shows is what our code says: progress,
evaluations, our notes and warnings, the summary, and any error that ends the run. All of
it, ours and theirs, also goes to the log file the summary names.

Which is which is decided by who writes, not by what the text says: a write to sys.stdout /
sys.stderr is ours when the first calling frame outside the logging and warnings machinery
belongs to one of OUR_PACKAGES (`is_ours`). So a library traceback that Ray prints for one
of its actors stays in the log, and our own warning reaches the console whatever its words.

- In the driver (`Console`): sys.stdout / sys.stderr are replaced for the run. Ours: the
  terminal and the log. Theirs (Ray's forwarded worker output, MLflow's and Ray's log
  lines, library warnings): the log only, or the terminal as well with `verbose`.
  A write from no Python frame at all (the interpreter reporting an exception, a thread's
  uncaught exception) counts as ours: errors are never hidden.
- In a Ray Train worker (`WorkerConsole`): everything still goes to the worker's own
  streams (Ray forwards those to the driver, hence to the log); our lines are in addition
  handed to `send` (the driver's sink actor), which the driver shows on the terminal. Our
  loggers' records (`checkpoints`: "committed checkpoint step N") are handed over too: INFO
  from rank 0, WARNING and above from every rank. A worker's failure reaches the console
  as the exception `trainer.fit()` raises in the driver, with the worker's traceback.

Not covered: bytes a C library writes straight to file descriptor 1 or 2 of the driver (none
in a normal run; the E-level lines come from Ray's actors, whose output Ray forwards).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import deque
from typing import Callable, TextIO

OUR_PACKAGES = frozenset({"pretrain", "orchestration", "checkpoints", "cluster"})
# Frames of these modules (and their submodules) are skipped when looking for the writer: a
# log record or a warning belongs to whoever logged or warned (logging.lastResort writes to
# sys.stderr for them); a write through a stream wrapper or a replaced `print` to whoever
# called it (ray.init has colorama wrap sys.stdout / sys.stderr when they are not a
# terminal; the driver's first forwarded worker line makes Ray's tqdm support replace
# builtins.print; Ray Train replaces it in its workers).
_PLUMBING = ("logging", "warnings", "traceback", "threading", "contextlib", "colorama",
             "ray.experimental.tqdm_ray", "ray.train.v2._internal.logging.patch_print",
             __name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _module_of(frame) -> str:
    name = frame.f_globals.get("__name__") or ""
    if name == "__main__":   # `python -m orchestration.cli`: the module it was run as
        spec = frame.f_globals.get("__spec__")
        name = getattr(spec, "name", None) or name
    return name


def is_ours(frame) -> bool | None:
    """True when the writer found from `frame` up is one of OUR_PACKAGES, False when it is
    another module, None when no Python frame remains (the interpreter itself writing)."""
    while frame is not None:
        name = _module_of(frame)
        if not any(name == p or name.startswith(p + ".") for p in _PLUMBING):
            return name.split(".", 1)[0] in OUR_PACKAGES
        frame = frame.f_back
    return None


def _caller(depth: int):
    try:
        return sys._getframe(depth + 1)
    except ValueError:
        return None


class RoutedStream:
    """A text stream that hands each write to `ours(text)` or `theirs(text)` by its writer
    (`is_ours`; None, no Python writer, goes to `ours`). Everything else is the wrapped
    stream's (fileno, encoding, isatty, buffer, ...)."""

    def __init__(self, stream: TextIO, ours: Callable[[str], None],
                 theirs: Callable[[str], None]):
        self._stream, self._ours, self._theirs = stream, ours, theirs

    @property
    def wrapped(self) -> TextIO:
        return self._stream

    def write(self, text: str) -> int:
        if text:
            (self._theirs if is_ours(_caller(1)) is False else self._ours)(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _retarget_handlers(old: TextIO, new: TextIO) -> list[logging.StreamHandler]:
    """Point logging handlers that write to `old` at `new`; returns those changed."""
    changed = []
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is old:
                h.setStream(new)
                changed.append(h)
    return changed


class Console:
    """The driver's console for one run; use as a context manager.

        with Console(verbose=False) as console:
            ...                               # everything written is routed
            console.open_log(path)            # until now held in memory, from now in `path`
            console.show("a worker's line")   # the terminal only (the log has it from Ray)

    `verbose`: everything on the terminal too (the old full output), the log as well."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.path: str | None = None
        self._lock = threading.RLock()
        self._pending: list[str] | None = []   # log text until the file is open
        self._file = None
        self._saved: tuple[TextIO, TextIO] | None = None
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []
        self._recent: deque[str] = deque(maxlen=32)

    # -- the log ---------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        text = _ANSI.sub("", text)
        with self._lock:
            if self._file is not None:
                self._file.write(text)
                self._file.flush()
            elif self._pending is not None:
                self._pending.append(text)

    def open_log(self, path: str) -> str:
        """Start writing the log to `path` (created with its folder; appended to), with
        everything written so far first."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self._lock:
            self._file = open(path, "a", encoding="utf-8", errors="replace")
            self._file.write("".join(self._pending or []))
            self._file.flush()
            self._pending = None
            self.path = path
        return path

    # -- the terminal ----------------------------------------------------------------------

    def _terminal(self, err: bool) -> TextIO:
        if self._saved is None:
            return sys.stderr if err else sys.stdout
        return self._saved[1] if err else self._saved[0]

    def show(self, text: str, err: bool = True) -> None:
        """`text` (one or more lines) on the terminal only; a line just shown is not shown
        again (ranks that say the same thing, a print and a log record of one event)."""
        with self._lock:
            for line in text.splitlines():
                if line in self._recent:
                    continue
                self._recent.append(line)
                out = self._terminal(err)
                out.write(line + "\n")
                out.flush()

    def _route(self, err: bool, ours: bool) -> Callable[[str], None]:
        def write(text: str) -> None:
            if ours or self.verbose:
                with self._lock:
                    self._terminal(err).write(text)
            self._log(text)
        return write

    # -- install / restore -----------------------------------------------------------------

    def __enter__(self) -> "Console":
        out, err = sys.stdout, sys.stderr
        out.flush(), err.flush()
        self._saved = (out, err)
        sys.stdout = RoutedStream(out, self._route(False, True), self._route(False, False))
        sys.stderr = RoutedStream(err, self._route(True, True), self._route(True, False))
        for old, new in ((out, sys.stdout), (err, sys.stderr)):
            self._handlers += [(h, old) for h in _retarget_handlers(old, new)]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._saved is None:
            return
        routed = (sys.stdout, sys.stderr)
        for s in routed:
            try:
                s.flush()
            except Exception:
                pass
        sys.stdout, sys.stderr = self._saved
        for h, old in self._handlers:
            if h.stream in routed:
                h.setStream(old)
        self._saved = None
        from pretrain.errors import UserError

        if exc_type is not None and self.path and not issubclass(exc_type, UserError):
            print(f"the run's full output is in {self.path}", file=sys.stderr, flush=True)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class WorkerConsole:
    """A Ray Train worker's half: our lines (prints and our loggers' records) of this
    process are also passed to `send(lines)`, from a background thread, in order; the
    worker's own streams keep everything. `close()` sends what is left (call it before the
    training function returns, so the driver has the lines before the summary)."""

    LOGGERS = tuple(sorted(OUR_PACKAGES))

    def __init__(self, send: Callable[[list[str]], object], rank: int,
                 wait: Callable[[object], None] | None = None):
        self.send, self.rank, self.wait = send, rank, wait
        self.pid = os.getpid()
        self._lines: deque[str] = deque()
        self._partial: dict[int, str] = {}
        self._wake = threading.Event()
        self._stop = False
        self._saved: tuple[TextIO, TextIO] | None = None
        self._handler: logging.Handler | None = None
        self._thread: threading.Thread | None = None
        self._last = None   # what `send` returned last (a Ray ObjectRef)

    def _ours(self, stream: TextIO) -> Callable[[str], None]:
        def write(text: str) -> None:
            stream.write(text)
            if os.getpid() != self.pid:   # a forked data-loader process: its streams only
                return
            key = threading.get_ident()
            text = self._partial.pop(key, "") + text
            *lines, rest = text.split("\n")
            if rest:
                self._partial[key] = rest
            self.put(lines)
        return write

    def put(self, lines: list[str]) -> None:
        lines = [ln.rstrip("\r") for ln in lines if ln.strip()]
        if lines:
            self._lines.extend(lines)   # deque.append is atomic: safe from a signal handler
            self._wake.set()

    def _record_handler(self) -> logging.Handler:
        console = self

        class Forward(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if os.getpid() != console.pid:
                    return
                if record.levelno < logging.WARNING and console.rank != 0:
                    return
                try:
                    console.put(self.format(record).split("\n"))
                except Exception:
                    self.handleError(record)

        handler = Forward(logging.INFO)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler

    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            self._flush()
            if self._stop:
                return

    def _flush(self):
        batch = []
        while self._lines:
            batch.append(self._lines.popleft())
        if not batch:
            return
        try:
            self._last = self.send(batch)
        except Exception:   # the driver is gone: the worker's own streams have the lines
            pass

    def __enter__(self) -> "WorkerConsole":
        out, err = sys.stdout, sys.stderr
        self._saved = (out, err)
        sys.stdout = RoutedStream(out, self._ours(out), out.write)
        sys.stderr = RoutedStream(err, self._ours(err), err.write)
        self._handler = self._record_handler()
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        self._thread = threading.Thread(target=self._run, name="console-forward", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._saved is None:
            return
        sys.stdout, sys.stderr = self._saved
        self._saved = None
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        for key, rest in list(self._partial.items()):
            self.put([rest])
        self._partial.clear()
        self._flush()
        if self._last is not None and self.wait is not None:
            try:
                self.wait(self._last)   # calls from one caller arrive in order: all are in
            except Exception:
                pass

