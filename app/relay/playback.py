"""Playback tracking: when each ``mark`` went to the carrier, when the carrier said it played, and whether the
caller has now heard everything the relay sent.

The downlink marks the end of every utterance of return audio; the carrier echoes a mark once it has played all
audio sent before it (Twilio's and Telnyx's ``mark`` event, also at once for marks a ``clear`` discarded). The
time between the two is the **playback lag**: how far the caller's ear trails what the relay has sent.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

#: Marks remembered at once; a carrier that never echoes marks must not grow this without bound.
MAX_MARKS_IN_FLIGHT = 64


@dataclass(frozen=True)
class MarkPlayback:
    """One echoed mark: how long after sending it played, and whether nothing the relay sent is still unplayed."""

    name: str
    lag_seconds: float
    heard_everything: bool


class PlaybackTracker:
    """Marks in flight for one leg; the downlink sends marks and audio, the uplink hears the echoes."""

    def __init__(self) -> None:
        self._sent_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._count = 0
        # Audio went to the carrier after the last mark: the caller has not heard all of it, whatever echoes.
        self._unmarked_audio = False
        self.last_lag_seconds: float | None = None

    def audio_sent(self) -> None:
        """Return audio went to the carrier (called per frame: one attribute write)."""
        self._unmarked_audio = True

    def next_mark(self) -> str:
        """Name the next mark and remember when it is sent (the caller sends it right after)."""
        with self._lock:
            self._count += 1
            name = f"utt-{self._count}"
            if len(self._sent_at) < MAX_MARKS_IN_FLIGHT:
                self._sent_at[name] = time.monotonic()
            self._unmarked_audio = False
        return name

    def played(self, name: str) -> MarkPlayback | None:
        """The carrier echoed ``name``; None for a mark this tracker did not send (or forgot)."""
        now = time.monotonic()
        with self._lock:
            sent_at = self._sent_at.pop(name, None)
            if sent_at is None:
                return None
            # Marks play in order: an echo also settles every earlier mark the carrier skipped (a clear).
            for earlier in [n for n, t in self._sent_at.items() if t <= sent_at]:
                del self._sent_at[earlier]
            heard_everything = not self._sent_at and not self._unmarked_audio
        self.last_lag_seconds = now - sent_at
        return MarkPlayback(name, now - sent_at, heard_everything)

    @property
    def in_flight(self) -> int:
        """Marks sent and not yet echoed."""
        return len(self._sent_at)
