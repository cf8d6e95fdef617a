"""Log lines that stay readable under hostile input: short lists, bounded lines, one line per kind.

Pure Python (no rclpy), shared by the runtime's notes and the node's logger:

- :func:`short_list` renders the first few items of a list and how many more, so 10,000 box ids
  never become a 70 KB line;
- :func:`clip_text` bounds any text (an exception message, a reason) to a length;
- :class:`LogLimiter` lets through at most one line per *kind* per period and says, on the next
  line of that kind, how many were held back meanwhile.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
import threading
import time

# A log line, prefix included ("[WARN] [1733337600.123456789] [moog]: "), stays under 1 KB.
MAX_LINE_CHARS = 900


def short_list(items: Iterable, limit: int = 8) -> str:
    """``'[1, 2, 3, ... (+9997 more)]'``: the first ``limit`` items of ``items``."""
    items = list(items)
    head = ', '.join(repr(x) if isinstance(x, str) else str(x) for x in items[:limit])
    more = f', ... (+{len(items) - limit} more)' if len(items) > limit else ''
    return f'[{head}{more}]'


def clip_text(text: str, max_chars: int = MAX_LINE_CHARS) -> str:
    """``text`` cut to ``max_chars`` characters (with a marker saying how much was cut)."""
    text = str(text)
    if len(text) <= max_chars:
        return text
    marker = f' ... [{len(text) - max_chars} more characters]'
    return text[:max(0, max_chars - len(marker))] + marker


class LogLimiter:
    """At most one line per kind per ``period_s``; every line at most ``max_chars``.

    ``limiter(kind, text)`` returns the line to log, or None when a line of the same kind was
    let through less than ``period_s`` ago. The next line that passes says how many of its kind
    were held back, so nothing disappears silently. Thread-safe (callbacks run on several
    executor threads).

    Args:
        period_s: the minimum time between two lines of one kind.
        max_chars: longest line returned.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, period_s: float = 5.0, max_chars: int = MAX_LINE_CHARS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = float(period_s)
        self.max_chars = int(max_chars)
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, kind: str, text: str) -> str | None:
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.period_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return None
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        suffix = (f' (+{held} more like this in the last {now - last:.0f} s)'
                  if held and last is not None else '')
        return clip_text(text, self.max_chars - len(suffix)) + suffix

    def emit(self, kind: str, text: str, write: Callable[[str], None]) -> bool:
        """Like calling the limiter, but writes the line itself (``write(line)``) and starts
        the period when the write returns: a line delayed between the decision and its
        timestamp (a busy interpreter) still ends up ``period_s`` after the previous one.
        Returns whether a line was written."""
        with self._lock:
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.period_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return False
            held = self._held.pop(kind, 0)
            suffix = (f' (+{held} more like this in the last {now - last:.0f} s)'
                      if held and last is not None else '')
            write(clip_text(text, self.max_chars - len(suffix)) + suffix)
            self._last[kind] = self._clock()
            return True

    def held(self) -> dict[str, int]:
        """Lines held back per kind since each kind's last line (a copy)."""
        with self._lock:
            return dict(self._held)
