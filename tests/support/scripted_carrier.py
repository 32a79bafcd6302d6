"""A carrier socket scripted by the test, for the relay core in-process (the Kallglot side stays real)."""
from __future__ import annotations

import base64
import json
import queue
import threading

from app.carriers.twilio.media import TwilioMediaCodec
from app.relay.core import MediaRelay, RelayEnd

STREAM_SID = "MZ" + "7" * 32


class ScriptedCarrier:
    """A carrier socket the test writes frames into (as Twilio would send them) and reads the relay's out of."""

    def __init__(self) -> None:
        self.connected = True
        self.inbox: queue.Queue[str | None] = queue.Queue()
        self.sent: list[dict] = []
        self.close_code: int | None = None

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        try:
            frame = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return frame

    def send(self, data: str | bytes) -> None:
        self.sent.append(json.loads(data))

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        self.connected, self.close_code = False, reason

    def media(self, payload: bytes) -> None:
        self.inbox.put(json.dumps({"event": "media", "streamSid": STREAM_SID,
                                   "media": {"track": "inbound", "payload": base64.b64encode(payload).decode()}}))

    def stop(self) -> None:
        self.inbox.put(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))

    def mark_played(self, name: str) -> None:
        """Echo mark ``name``, as Twilio does once playback reaches it."""
        self.inbox.put(json.dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": name}}))

    def events(self, kind: str) -> list[dict]:
        """The frames of one ``event`` kind the relay sent so far."""
        return [frame for frame in list(self.sent) if frame.get("event") == kind]


def started_codec() -> TwilioMediaCodec:
    """The product's Twilio codec after a ``start`` (it then knows the stream it serves)."""
    codec = TwilioMediaCodec()
    codec.parse(json.dumps({"event": "start", "streamSid": STREAM_SID,
                            "start": {"callSid": "CA" + "7" * 32, "streamSid": STREAM_SID}}))
    return codec


def run_relay(relay: MediaRelay) -> tuple[threading.Thread, list[RelayEnd]]:
    """Run ``relay`` in a thread; the list gets its end when it returns."""
    ends: list[RelayEnd] = []
    thread = threading.Thread(target=lambda: ends.append(relay.run()), daemon=True)
    thread.start()
    return thread, ends
