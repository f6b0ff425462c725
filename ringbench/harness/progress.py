"""Progress of a long run on one terminal line: ``pass 3/7 (warm-up 1/1 done)  12.3 s elapsed, about 18.1 s left``.

:class:`Progress` is pure: it writes to the stream it is given and reads the clock it is given, so it is tested
with a fake stream and clock. The line is redrawn in place (``\\r``) after every pass and erased at the end, so
nothing of it stays in the terminal's scrollback and nothing at all is written when the stream is not a terminal.
:func:`stderr_is_terminal` decides that for a rank started by an MPI launcher, whose own stderr is a pipe.
"""

from __future__ import annotations

import os
import sys
import time

# Processes that forward a rank's output to their own stderr (MPICH's hydra, Open MPI, Slurm's srun)
LAUNCHERS = ("hydra_pmi_proxy", "mpiexec", "mpiexec.hydra", "mpirun", "orted", "orterun", "prted", "prterun", "srun")


class Progress:
    """Pass ``i`` of ``total`` (warm-ups included), time elapsed and an estimate of the time left."""

    def __init__(self, total: int, stream=None, clock=time.monotonic, warmup: int = 0, enabled: bool = True):
        self.total, self.warmup, self.stream, self.clock = total, warmup, stream, clock
        self.enabled = enabled and stream is not None and total > 0
        self.done = 0
        self.width = 0
        self.start = clock()

    def tick(self, result=None):
        """One pass is done: redraw the line. Returns ``result`` (so a loop can write ``tick(ring.forward())``)."""
        self.done += 1
        if self.enabled:
            self._draw(self.line())
        return result

    def line(self) -> str:
        elapsed = self.clock() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        what = f"pass {self.done}/{self.total}"
        if self.warmup:
            what += f" ({self.warmup} warm-up{'s' if self.warmup > 1 else ''})"
        return f"{what}  {elapsed:.1f} s elapsed, about {left:.1f} s left"

    def close(self) -> None:
        """Erase the line (the cursor goes back to where it was)."""
        if self.enabled and self.width:
            self._draw("")
        self.enabled = False

    def _draw(self, text: str) -> None:
        pad = max(self.width - len(text), 0)
        self.stream.write("\r" + text + " " * pad + ("\r" if not text else ""))
        self.stream.flush()
        self.width = len(text)


def stderr_is_terminal() -> bool:
    """Whether this process's stderr ends on a terminal: it is one, or it is the pipe of an MPI launcher (the
    ranks' forwarder and the launcher, as /proc shows them) whose own stderr is a terminal."""
    if os.isatty(2):
        return True
    pid = os.getppid()
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            target = os.readlink(f"/proc/{pid}/fd/2")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if name not in LAUNCHERS:
            return False
        if target.startswith(("/dev/pts/", "/dev/tty")):
            return True
        if not target.startswith("pipe:"):
            return False
        pid = parent
    return False


def for_run(total: int, warmup: int, show: bool) -> Progress:
    """The progress line of ``ringbench run`` on stderr: shown when ``show`` (rank 0, not --quiet) and stderr
    ends on a terminal."""
    return Progress(total, sys.stderr, warmup=warmup, enabled=show and stderr_is_terminal())
