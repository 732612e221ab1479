"""What a person reads while training runs: one progress line every few iterations.

A line reads ``iter 40/80  toy_object_color 0.812  toy_shape 0.331  kl 0.0012  1.9 s/it  ETA 1m16s``.
Lines the pipeline's console should show start with :data:`CONSOLE_MARK` (``mixgrpo run-local``
prints exactly those and sends everything else to the step's log file).
"""

from __future__ import annotations

import os
import sys

CONSOLE_MARK = "[mixgrpo] "
MARK_ENV = "MIXGRPO_CONSOLE_MARK"
"""When set (by run-local) every console line is prefixed with :data:`CONSOLE_MARK`."""


def say(text: str) -> None:
    """Print one line for the person watching (marked when run under the pipeline's console)."""
    print((CONSOLE_MARK if os.environ.get(MARK_ENV) else "") + text, flush=True)
    sys.stdout.flush()


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_every(total: int, lines: int = 8) -> int:
    """Iterations between progress lines: about ``lines`` lines per run."""
    return max(1, -(-total // lines))


def short_name(name: str) -> str:
    """``toy_object_color`` -> ``object_color``, ``heldout_diversity`` -> ``diversity``: names on one line."""
    return name.removeprefix("toy_").removeprefix("heldout_")


def held_out_line(held_out: dict[str, float]) -> str:
    """``held-out object_color 0.912 shape 0.307 ...``: the latest held-out evaluation on one line."""
    return "held-out " + " ".join(f"{short_name(k)} {v:.3f}" for k, v in held_out.items())


def progress_line(record: dict, total: int, seconds_per_iteration: float) -> str:
    """The progress line of one training record (see the module docstring)."""
    done = int(record["iteration"])
    rewards = "  ".join(f"{short_name(name)} {stats['mean']:.3f}" for name, stats in record.get("rewards", {}).items())
    held = record.get("held_out")
    held_text = f"  | {held_out_line(held)}" if held else ""
    return (f"iter {done}/{total}  {rewards}  kl {record.get('approx_kl', float('nan')):.1e}  "
            f"{seconds_per_iteration:.2f} s/it  ETA {duration(seconds_per_iteration * (total - done))}{held_text}")
