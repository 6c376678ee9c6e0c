"""Progress output: plain periodic lines off a terminal (torchx, Slurm, log files), a bar on one."""

from __future__ import annotations

import io

from recsys_mtl.train.loop import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_at_most_every_period():
    out = io.StringIO()
    p = Progress(total=5, initial=0, enabled=True, every_seconds=0.0, stream=out)
    p.set_postfix(loss="0.5000")
    for _ in range(3):
        p.update()
    p.write("epoch 0: done")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["step 1/5: loss=0.5000", "step 2/5: loss=0.5000", "step 3/5: loss=0.5000", "epoch 0: done"]
    quiet = io.StringIO()
    p = Progress(total=None, initial=0, enabled=True, every_seconds=3600.0, stream=quiet)
    for _ in range(100):
        p.update()
    assert quiet.getvalue() == ""  # within the period: nothing, never one line per refresh
    assert "\r" not in out.getvalue()


def test_a_bar_on_a_terminal_and_silence_on_other_ranks():
    tty = _Tty()
    p = Progress(total=2, initial=0, enabled=True, stream=tty)
    p.update()
    p.close()
    assert "\r" in tty.getvalue() and "step" in tty.getvalue()
    other = io.StringIO()
    p = Progress(total=2, initial=0, enabled=False, every_seconds=0.0, stream=other)
    p.update()
    p.write("x")
    assert other.getvalue() == ""
