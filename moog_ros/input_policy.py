"""What counts as the camera stream: one stray frame must not cost the tracking state.

The runtime resets its recurrent state when the input resolution changes or the stamp jumps
(backwards, or forwards by more than ``reset_gap``). On a live topic that is fragile: a second
publisher, a single frame of another encoding or size, or one frame stamped in 2038 would wipe
every track -- twice, since the next good frame is a change again. :class:`InputPolicy` sits in
front of the runtime and decides per frame, from the header alone:

- the **stream identity** is ``(encoding, width, height)``: pinned by parameters where given,
  otherwise learned from the first accepted frame. A frame of another identity is *foreign*:
  dropped and counted, the state untouched;
- the **timeline** is the last accepted stamp: a frame stamped backwards, or jumping more than
  ``max(reset_gap, 1 s)`` ahead of both the last stamp and the receiver's clock, is an
  *outlier*: dropped and counted (a forward gap up to the clock is a pause: accepted, and the
  runtime resets on it as before);
- only a **sustained** change is accepted, with a reset reason for the runtime: at least
  ``change_frames`` consecutive frames that agree with each other (same new identity; stamps not
  going backwards among them), arriving while the stream has been silent for at least
  ``change_frames`` of its frame periods (an average of the intervals between its accepted
  frames, at most 1 s). ``change_frames = 1`` is the old behaviour (every change resets at once).
  The silence requirement is what keeps a lossy link honest: when a few of the camera's frames
  are lost (a best-effort reader overwritten during a stall), three strays that happen to be
  adjacent are still not a new stream, because the camera was heard from moments ago.

"Consecutive" is strict: any other frame in between -- a frame of the stream, or of a third
identity -- starts the count again, so a stray publisher between the camera's frames never
gets there.
Pure Python; the node calls it from its image callback, before a frame can displace the one
waiting for inference.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import threading
import time

# Kinds of policy drops (the node counts and logs them by these names).
FOREIGN = 'foreign_frame'
OUTLIER = 'time_outlier'
_MAX_PERIOD_S = 1.0  # a frame period counts at most this much towards the silence a switch needs


@dataclass(frozen=True)
class InputPolicyConfig:
    """Attributes:
        encoding: the stream's encoding (CompressedImage: its format); '' = the first frame's.
        width, height: the stream's size; 0 = the first frame's.
        change_frames: consecutive frames that make a change of identity or timeline stick.
        reset_gap_s: a stamp more than ``max(reset_gap_s, 1 s)`` past the last accepted one
            and past the clock is an outlier.
    """

    encoding: str = ''
    width: int = 0
    height: int = 0
    change_frames: int = 3
    reset_gap_s: float = 2.0

    def __post_init__(self) -> None:
        if self.change_frames < 1 or self.width < 0 or self.height < 0 or self.reset_gap_s < 0:
            raise ValueError(f'InputPolicyConfig: change_frames >= 1, width/height >= 0 and '
                             f'reset_gap_s >= 0 needed, got {self}')


@dataclass(frozen=True)
class Verdict:
    """``accept``: hand the frame on; ``reset``: the reason to reset first (a sustained change),
    else None; ``drop``: the kind of a refused frame (:data:`FOREIGN`, :data:`OUTLIER`);
    ``detail``: what was wrong, for the log."""

    accept: bool
    reset: str | None = None
    drop: str | None = None
    detail: str = ''


_ACCEPT = Verdict(True)


def _name(identity: tuple[str, int, int]) -> str:
    encoding, width, height = identity
    return f'{encoding} {width}x{height}'


class InputPolicy:
    """Accepts or drops frames by stream identity and timeline (see the module docstring).

    Thread-safe; ``check`` is cheap (no pixels).
    """

    def __init__(self, config: InputPolicyConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock  # arrival time, monotonic seconds (injectable for tests)
        self.configure(config)

    def configure(self, config: InputPolicyConfig) -> None:
        """A new policy. The learned identity and timeline are kept unless the pinned stream
        (encoding, width, height) changed."""
        with self._lock:
            old = getattr(self, 'config', None)
            self.config = config
            if old is not None and (old.encoding, old.width, old.height) == (
                    config.encoding, config.width, config.height):
                return
            self._identity: tuple[str, int, int] | None = None
            self._last_ns: int | None = None
            self._last_arrival: float | None = None  # of the last accepted frame
            self._period_s = 0.0  # average interval between accepted frames (0: unknown)
            # (identity, last stamp, count) of a change that is not sustained yet.
            self._candidate: tuple[tuple[str, int, int], int, int] | None = None

    @property
    def identity(self) -> tuple[str, int, int] | None:
        return self._identity

    def _pinned_mismatch(self, identity: tuple[str, int, int]) -> str:
        cfg = self.config
        encoding, width, height = identity
        wrong = []
        if cfg.encoding and encoding != cfg.encoding:
            wrong.append(f'encoding {encoding!r} (stream_encoding {cfg.encoding!r})')
        if cfg.width and width != cfg.width:
            wrong.append(f'width {width} (stream_width {cfg.width})')
        if cfg.height and height != cfg.height:
            wrong.append(f'height {height} (stream_height {cfg.height})')
        return ', '.join(wrong)

    def _follows(self, previous_ns: int, stamp_ns: int, now_ns: int | None) -> bool:
        """``stamp_ns`` continues a timeline whose last stamp is ``previous_ns``: not
        backwards, and not a jump into the future (more than the tolerance past both the last
        stamp and the clock). A forward gap up to the clock is a pause, not an outlier: the
        runtime resets on it by itself (``reset_gap``), and a slow camera keeps every frame."""
        if stamp_ns < previous_ns:
            return False
        tolerance = self.future_tolerance_ns
        return not (stamp_ns - previous_ns > tolerance and now_ns is not None
                    and stamp_ns - now_ns > tolerance)

    @property
    def future_tolerance_ns(self) -> float:
        """How far past the clock a stamp may jump: ``max(reset_gap_s, 1 s)``."""
        return max(self.config.reset_gap_s, 1.0) * 1e9

    def check(self, encoding: str, width: int, height: int, stamp_ns: int,
              now_ns: int | None = None) -> Verdict:
        """The verdict on one frame; an accepted frame becomes the stream's latest.

        Args:
            encoding, width, height: the frame's identity (from its header).
            stamp_ns: its header stamp.
            now_ns: the receiver's clock (ROS time), so a frame stamped far ahead of it (2038)
                is told from a pause; None: forward jumps are never outliers.
        """
        identity = (str(encoding), int(width), int(height))
        stamp_ns = int(stamp_ns)
        arrival = self._clock()
        with self._lock:
            pinned = self._pinned_mismatch(identity)
            if pinned:  # parameters pin the stream: never switch to another
                return Verdict(False, drop=FOREIGN, detail=f'not the configured stream: {pinned}')
            if self._identity is None:  # the first frame defines the stream
                self._accept(identity, stamp_ns, arrival)
                return _ACCEPT
            if identity == self._identity and self._follows(self._last_ns, stamp_ns, now_ns):
                self._accept(identity, stamp_ns, arrival)
                return _ACCEPT
            # A change: of identity, or of timeline. It sticks after change_frames frames in a
            # row that agree with each other.
            # A frame continues a pending change if it has the same identity and is not
            # stamped before it (no gap limit: a camera restarted at a low rate must still be
            # able to switch). A 2038 stray followed by a real frame is not continued: the real
            # frame goes back in time relative to it, and follows the stream instead.
            candidate = self._candidate
            if (candidate is not None and candidate[0] == identity
                    and stamp_ns >= candidate[1]):
                count = candidate[2] + 1
            else:
                count = 1
            if identity != self._identity:
                kind = FOREIGN
                detail = f'{_name(identity)} is not the stream ({_name(self._identity)})'
            else:
                kind = OUTLIER
                jump = (stamp_ns - self._last_ns) / 1e9
                detail = (f'stamp {jump:+.3f} s from the last accepted frame' if jump < 0
                          else f'stamp {(stamp_ns - now_ns) / 1e9:.3f} s ahead of the clock')
            silence = arrival - self._last_arrival
            if (count >= self.config.change_frames
                    and silence >= self.config.change_frames * self._period_s):
                reason = (f'{detail}, for {count} consecutive frames over {silence:.2f} s: the '
                          'stream changed')
                self._accept(identity, stamp_ns, arrival)
                self._period_s = 0.0  # the new stream's rate is not known yet
                return Verdict(True, reset=reason)
            self._candidate = (identity, stamp_ns, count)
            return Verdict(False, drop=kind, detail=detail)

    def _accept(self, identity: tuple[str, int, int], stamp_ns: int, arrival: float) -> None:
        if self._last_arrival is not None and self._identity == identity:
            interval = min(_MAX_PERIOD_S, max(0.0, arrival - self._last_arrival))
            self._period_s = (interval if self._period_s == 0.0
                              else 0.9 * self._period_s + 0.1 * interval)
        self._identity, self._last_ns, self._candidate = identity, stamp_ns, None
        self._last_arrival = arrival
