"""A small ``/diagnostics`` reporter for the node (no ``diagnostic_updater`` wheel exists).

:class:`PipelineMonitor` collects what the node sees (frames received, processed, replaced while
waiting, dropped as stale or invalid, missed before they reached the node, step and end-to-end
latency, state resets) from the executor and inference threads under one lock, and turns it
into one ``diagnostic_msgs/DiagnosticStatus`` per report. Rates and levels are computed over
the interval since the previous report, so a burst of drops shows up as WARN for one period
instead of being averaged away.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping
import math
import threading

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np

from moog_ros.logtext import clip_text

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)


class RateMeter:
    """Events per second over a sliding time window (monotonic seconds in, Hz out)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = float(window_s)
        self._times: deque[float] = deque()

    def tick(self, now_s: float) -> None:
        self._times.append(now_s)
        self._trim(now_s)

    def rate_hz(self, now_s: float) -> float:
        """Events per second in the window ending at ``now_s``; 0 with fewer than two events."""
        self._trim(now_s)
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        # (n - 1) intervals over the span between first and last event: unbiased for steady input.
        return (len(self._times) - 1) / span if span > 0 else 0.0

    def _trim(self, now_s: float) -> None:
        while self._times and self._times[0] < now_s - self.window_s:
            self._times.popleft()


class RollingPercentiles:
    """The last ``size`` samples; percentiles on demand (NaN when empty)."""

    def __init__(self, size: int = 200) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._samples.append(float(value))

    def percentile(self, q: float) -> float:
        if not self._samples:
            return math.nan
        return float(np.percentile(np.fromiter(self._samples, float), q))

    def __len__(self) -> int:
        return len(self._samples)


def key_values(values: Mapping[str, object]) -> list[KeyValue]:
    """``KeyValue`` list; floats get 3 decimals, NaN prints as 'n/a'."""
    out = []
    for key, value in values.items():
        if isinstance(value, float):
            text = 'n/a' if math.isnan(value) else f'{value:.3f}'
        else:
            text = str(value)
        out.append(KeyValue(key=key, value=text))
    return out


class PipelineMonitor:
    """Thread-safe counters and timings of the per-frame pipeline, reported as diagnostics.

    Args:
        name: status name, by convention ``'<node name>: <task>'``.
        hardware_id: the device the model runs on (e.g. ``'cuda:0'``).
        stale_after_s: no input for this long turns the status STALE.
    """

    def __init__(self, name: str, hardware_id: str, stale_after_s: float = 2.0) -> None:
        self.name = name
        self.hardware_id = hardware_id
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._input_rate = RateMeter()
        self._processed_rate = RateMeter()
        self._step_ms = RollingPercentiles()
        self._latency_ms = RollingPercentiles()
        self._counts = dict.fromkeys(
            ('received', 'processed', 'replaced', 'stale', 'invalid', 'missed', 'errors',
             'resets', 'policy'), 0)
        # Messages refused by the input policy or a limit (and invalid ones), by kind.
        self._dropped: dict[str, int] = {}
        self._last_policy = ''
        self._reported = dict(self._counts)
        self._last_input_s: float | None = None
        self._last_error = ''
        self._last_invalid = ''
        self._last_reset = ''

    def received(self, now_s: float) -> None:
        """A frame arrived (before any check)."""
        with self._lock:
            self._counts['received'] += 1
            self._input_rate.tick(now_s)
            self._last_input_s = now_s

    def replaced(self) -> None:
        """A waiting frame was replaced by a newer one before inference took it."""
        with self._lock:
            self._counts['replaced'] += 1

    def missed(self, count: int) -> None:
        """``count`` frames never reached the node (gaps in the publisher's sequence numbers:
        overwritten in the keep-last reader, or lost in transport)."""
        with self._lock:
            self._counts['missed'] += int(count)

    def stale(self) -> None:
        """A frame waited in the node longer than ``max_frame_age`` before inference."""
        with self._lock:
            self._counts['stale'] += 1

    def invalid(self, reason: str, kind: str = 'invalid_frame') -> None:
        """A frame could not be converted (bad encoding, size, data); counted under ``kind``
        too."""
        with self._lock:
            self._counts['invalid'] += 1
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            self._last_invalid = reason

    def dropped(self, kind: str, reason: str = '') -> None:
        """A message was refused by the input policy or a limit (a foreign frame, a stamp
        outlier, too many detections, a singular K, ...)."""
        with self._lock:
            self._counts['policy'] += 1
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            self._last_policy = f'{kind}: {reason}' if reason else kind

    def dropped_by_kind(self) -> dict[str, int]:
        """Totals since start of invalid and refused messages per kind (a copy)."""
        with self._lock:
            return dict(self._dropped)

    def error(self, reason: str) -> None:
        """Inference or publishing raised."""
        with self._lock:
            self._counts['errors'] += 1
            self._last_error = reason

    def reset(self, reason: str) -> None:
        with self._lock:
            self._counts['resets'] += 1
            self._last_reset = reason

    def processed(self, now_s: float, step_ms: float, latency_ms: float) -> None:
        """A frame went through the model and every output was published."""
        with self._lock:
            self._counts['processed'] += 1
            self._processed_rate.tick(now_s)
            self._step_ms.add(step_ms)
            self._latency_ms.add(latency_ms)

    def counts(self) -> dict[str, int]:
        """Totals since start (a copy)."""
        with self._lock:
            return dict(self._counts)

    def status(self, now_s: float, extra: Mapping[str, object] | None = None
               ) -> DiagnosticStatus:
        """The status for this report; levels judge only what happened since the last report.

        Args:
            now_s: monotonic seconds.
            extra: more key/values appended after the standard ones (model, state age, ...).
        """
        with self._lock:
            delta = {k: self._counts[k] - self._reported[k] for k in self._counts}
            self._reported = dict(self._counts)
            values: dict[str, object] = {
                'input_rate_hz': self._input_rate.rate_hz(now_s),
                'processed_rate_hz': self._processed_rate.rate_hz(now_s),
                'step_ms_p50': self._step_ms.percentile(50),
                'step_ms_p95': self._step_ms.percentile(95),
                'latency_ms_p50': self._latency_ms.percentile(50),
                'latency_ms_p95': self._latency_ms.percentile(95),
                'frames_received': self._counts['received'],
                'frames_processed': self._counts['processed'],
                'frames_replaced': self._counts['replaced'],
                'frames_dropped_stale': self._counts['stale'],
                'frames_dropped_invalid': self._counts['invalid'],
                'frames_missed': self._counts['missed'],
                # Every camera frame that got no outputs, whatever the reason.
                'frames_skipped': sum(self._counts[k] for k in (
                    'replaced', 'stale', 'invalid', 'missed', 'errors')),
                'errors': self._counts['errors'],
                'state_resets': self._counts['resets'],
                'last_reset_reason': self._last_reset or 'none',
                'dropped_by_policy': self._counts['policy'],
                **{f'dropped_{kind}': count for kind, count in sorted(self._dropped.items())},
            }
            if self._last_input_s is None or now_s - self._last_input_s > self.stale_after_s:
                level, message = STALE, 'no input images'
            elif delta['errors']:
                level, message = ERROR, f'inference failed: {self._last_error}'
            elif delta['invalid']:
                level, message = WARN, f'{delta["invalid"]} invalid frames: {self._last_invalid}'
            elif delta['stale']:
                level, message = WARN, (f'{delta["stale"]} frames waited longer than '
                                        'max_frame_age')
            elif delta['policy']:
                level, message = WARN, (f'{delta["policy"]} messages dropped by the input '
                                        f'policy: {self._last_policy}')
            else:
                level, message = OK, 'running'
        if extra:
            values.update(extra)
        return DiagnosticStatus(level=level, name=self.name, message=clip_text(message, 300),
                                hardware_id=self.hardware_id, values=key_values(values))


def diagnostic_array(stamp, statuses: list[DiagnosticStatus]) -> DiagnosticArray:
    """Wraps statuses in a ``DiagnosticArray`` stamped with the node clock's ``stamp``."""
    msg = DiagnosticArray(status=statuses)
    msg.header.stamp = stamp
    return msg
