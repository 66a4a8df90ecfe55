"""Progress for long loops that are not training: a tqdm bar on a terminal, periodic log lines otherwise.

Snakemake jobs write to a log file (``> {log} 2>&1``), where a bar would be one endless line of carriage returns; there
the loop logs ``<what>: i/n (p%), elapsed, ~left`` at most every ``every_s`` seconds (and for the first and last item).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "case",
    logger: logging.Logger | None = None,
    every_s: float = 30.0,
    tty: bool | None = None,
) -> Iterator[T]:
    """Yield ``items`` while showing progress (see the module docstring).

    Args:
        items: the work items.
        desc: what is being done (``"evaluate phantom_organs"``).
        total: number of items (default ``len(items)`` when it has one).
        unit: item name in the messages.
        logger: where the periodic lines go (default this module's logger).
        every_s: minimum seconds between two log lines.
        tty: force the bar (True) or the log lines (False); default: whether stderr is a terminal.
    """
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    tty = sys.stderr.isatty() if tty is None else tty
    if tty:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
        return
    log = logger or logging.getLogger(__name__)
    t0 = last = time.perf_counter()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if i == 1 or i == total or now - last >= every_s:
            last = now
            elapsed = now - t0
            if total:
                left = elapsed / i * (total - i)
                log.info("%s: %d/%d %ss (%.0f%%), %.1f s elapsed, ~%.0f s left", desc, i, total, unit,
                         100.0 * i / total, elapsed, left)
            else:
                log.info("%s: %d %ss, %.1f s elapsed", desc, i, unit, elapsed)
