"""Progress off a terminal: plain lines at most every interval, driven by a fake clock."""

import io

from easier.report.progress import plain_progress, progress


class Clock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_lines_only_when_the_interval_has_passed():
    out = io.StringIO()
    # start at 0, then one reading after each of 5 items, then one for the closing line
    clock = Clock([0.0, 4.0, 11.0, 15.0, 20.0, 33.0, 34.0])
    items = list(plain_progress(range(5), desc="train 1/1", stream=out, interval=10.0,
                                clock=clock))
    assert items == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines() == ["train 1/1: 2/5 batches, 11 s",
                                           "train 1/1: 5/5 batches, 33 s",
                                           "train 1/1: done, 5 batches in 34 s"]


def test_a_short_loop_prints_nothing():
    out = io.StringIO()
    clock = Clock([0.0, 1.0, 2.0, 3.0])
    assert list(plain_progress(iter([7, 8, 9]), desc="entropy", stream=out, interval=10.0,
                               clock=clock)) == [7, 8, 9]
    assert out.getvalue() == ""


def test_a_file_gets_plain_progress_not_a_bar():
    out = io.StringIO()  # isatty() is False, as for a log file
    wrapped = progress(range(3), desc="x", stream=out)
    assert list(wrapped) == [0, 1, 2] and "tqdm" not in type(wrapped).__name__
    assert "\r" not in out.getvalue()
