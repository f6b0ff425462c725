"""The progress line of a long run: drawn in place on a terminal, erased at the end, silent elsewhere."""

import io
import subprocess
import sys

from ringbench.harness.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_line_counts_passes_and_estimates_the_time_left():
    out, clock = io.StringIO(), Clock()
    bar = Progress(4, out, clock, warmup=1)
    clock.t += 2.0
    assert bar.tick("result") == "result"
    assert out.getvalue() == "\rpass 1/4 (1 warm-up)  2.0 s elapsed, about 6.0 s left"
    clock.t += 4.0
    bar.tick()
    assert out.getvalue().endswith("\rpass 2/4 (1 warm-up)  6.0 s elapsed, about 6.0 s left")
    assert "\n" not in out.getvalue()  # redrawn in place, never a new line


def test_close_erases_the_line_and_a_shorter_line_covers_a_longer_one():
    out, clock = io.StringIO(), Clock()
    bar = Progress(12, out, clock)
    clock.t += 100.0
    bar.tick()
    first = len("pass 1/12  100.0 s elapsed, about 1100.0 s left")
    clock.t = 100.0 + 1.0  # a shorter line next: padded over the old one
    bar.tick()
    second = out.getvalue().split("\r")[-1]
    assert len(second) == first and second.startswith("pass 2/12  1.0 s elapsed")
    bar.close()
    assert out.getvalue().endswith("\r" + " " * len("pass 2/12  1.0 s elapsed, about 5.0 s left") + "\r")
    bar.tick()  # after close: nothing more
    assert out.getvalue().endswith("\r")


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = Progress(3, out, Clock(), enabled=False)
    bar.tick()
    bar.close()
    assert out.getvalue() == ""


def test_a_pipe_is_not_a_terminal():
    code = "from ringbench.harness.progress import stderr_is_terminal; print(stderr_is_terminal())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"  # stderr is a pipe, and its reader (this test) is no MPI launcher
