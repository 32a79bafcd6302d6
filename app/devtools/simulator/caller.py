"""How a simulated caller waits to be answered: the patient caller of the chaos run, shared by the Twilio, TeXML
and Call Control simulators.

A caller talks, then waits for an answer: until they hear returned audio (or a spoken message, or the stream is
ended for them), but no longer than their *patience*; then they listen a little more and hang up. Each media
stream of a call is one :class:`StreamWait` — a restored stream gets its own, after the caller's "hello?".

Dead air is a caller who waited their whole patience on a stream and heard nothing (:attr:`StreamWait.silent`).
A slow answer is not dead air, but it is measured: :attr:`StreamWait.first_audio_seconds` is the time from the
end of talking to the first returned audio, so latency stays visible beside the dead-air count.

Why 5 seconds by default (:data:`DEFAULT_PATIENCE_SECONDS`): a caller who has just spoken into a translated call
expects a pause (the translation follows the utterance), and people on a phone line give a silence a few
seconds before they say "hello?" or hang up. Five seconds is the wait the carriers themselves give a caller to
respond (the default ``timeout`` of Twilio's ``<Gather>``), far longer than an answer should take on a healthy
bridge (well under 1 s), and far shorter than a caller left in silence for good (the bridge's own reconnect and
heartbeat windows run longer). It is a model of a caller, not a measurement of one; ``--patience`` changes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

#: How long a caller waits in silence for an answer before the call counts as dead air (see the module docstring).
DEFAULT_PATIENCE_SECONDS = 5.0


@dataclass
class StreamWait:
    """One media stream as its caller lived it; times are wall-clock (``time.time()``), to line up with logs."""

    #: When the caller stopped talking on this stream (their words, or "hello?" on a restored stream).
    talk_ended_at: float
    #: How long the caller was prepared to wait in silence after that.
    patience_seconds: float
    #: When the first returned audio arrived on this stream (None: none ever did).
    first_audio_at: float | None = None
    #: When the stream ended, by either side (None: still open, i.e. being judged while it runs).
    ended_at: float | None = None
    #: Not the call's first stream: a restored one, where the caller said "hello?".
    restored: bool = False

    @property
    def first_audio_seconds(self) -> float | None:
        """Seconds from the end of talking to the first returned audio (0 when it came while the caller was
        still talking); None if no audio ever came on this stream."""
        if self.first_audio_at is None:
            return None
        return max(0.0, self.first_audio_at - self.talk_ended_at)

    @property
    def open_seconds(self) -> float:
        """How long the stream stayed up after the caller stopped talking."""
        end = self.ended_at if self.ended_at is not None else time.time()
        return max(0.0, end - self.talk_ended_at)

    @property
    def silent(self) -> bool:
        """Dead air: the stream stayed up for the caller's whole patience after they talked and they heard
        nothing on it in that time. A stream the bridge ended sooner (the caller hears why next) is not."""
        heard_in_time = self.first_audio_seconds is not None and self.first_audio_seconds <= self.patience_seconds
        return not heard_in_time and self.open_seconds >= self.patience_seconds

    def later_than(self, seconds: float) -> bool:
        """The first audio came later than ``seconds`` after talking, or never while the stream stayed up that
        long (how the old 1-second-listening caller judged a call: it had hung up by then)."""
        if self.first_audio_seconds is not None:
            return self.first_audio_seconds > seconds
        return self.open_seconds > seconds

    def waited_seconds(self) -> float:
        """How long the caller waited in silence on this stream (for ranking the slowest calls)."""
        first = self.first_audio_seconds
        return first if first is not None else self.open_seconds

    def as_dict(self) -> dict[str, object]:
        """JSON for the fake Telnyx's control API."""
        return {"talk_ended_at": self.talk_ended_at, "patience_seconds": self.patience_seconds,
                "first_audio_at": self.first_audio_at, "ended_at": self.ended_at, "restored": self.restored}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> StreamWait:
        """The inverse of :meth:`as_dict`."""
        def number(name: str) -> float | None:
            value = data.get(name)
            return float(value) if isinstance(value, (int, float)) else None
        return cls(talk_ended_at=number("talk_ended_at") or 0.0, patience_seconds=number("patience_seconds") or 0.0,
                   first_audio_at=number("first_audio_at"), ended_at=number("ended_at"),
                   restored=bool(data.get("restored")))
