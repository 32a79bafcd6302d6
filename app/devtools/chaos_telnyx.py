"""The chaos run's Telnyx calls (:mod:`app.devtools.chaos`): TeXML calls through the TeXML simulator and Call
Control calls through the fake Telnyx (REST API + call side), each under the same scenarios as the Twilio calls,
with what each caller experienced reduced to the fields the run's tally and timelines read
(:class:`HeardCall`, shaped like the Twilio simulator's ``CallResult``).

On Telnyx the scenarios take that carrier's shape: ``callbacks`` repeats (TeXML status callbacks twice, Call
Control webhooks delivered twice and concurrently) or reverses them (``call.hangup`` before ``streaming.stopped``);
``caller-drop`` drops the media socket with no callback or webhook after it; ``worker-kill`` on Call Control
waits for the stream to be restored (``start_streaming`` again), on TeXML the ``<Redirect>`` after ``<Connect>``
restores it.
"""
from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from app.devtools.simulator.caller import DEFAULT_PATIENCE_SECONDS, StreamWait
from app.devtools.simulator.telnyx import TelnyxMediaLeg, TelnyxSigner, TexmlCallSimulator, new_call_control_id

#: The carrier modes a chaos call may use (``--carriers``).
TWILIO, TEXML, CALL_CONTROL = "twilio", "texml", "call-control"
MODES = (TWILIO, TEXML, CALL_CONTROL)
#: The Call Control application the bridge dials agent legs through (the fake accepts any id).
CONNECTION_ID = "1494404757140276705"
FAKE_API_KEY = "KEY-chaos-telnyx"
#: How long a Call Control call may take before the caller counts as stranded (left on a silent line).
CALL_CONTROL_CALL_SECONDS = 60.0


@dataclass
class HeardCall:
    """What one Telnyx caller experienced, in the attributes the run's report reads from a Twilio result."""

    call_sid: str
    heard_audio: bytes = b""
    said: list[str] = field(default_factory=list)
    streams: int = 0
    sent_audio: bytes = b""
    timeline: list[tuple[float, str]] = field(default_factory=list)
    custom_parameters: dict[str, str] = field(default_factory=dict)
    #: The call was still up, with nothing more coming from the bridge, when the caller gave up waiting.
    stranded: bool = False
    #: Each stream as the caller waited on it (app.devtools.simulator.caller), in order.
    waits: list[StreamWait] = field(default_factory=list)
    #: Wall-clock time of the timeline's t+0 (the report stamps it like the bridge's log lines).
    started_at: float = 0.0


def _timeline(started_at: float, stamped: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Wall-clock stamped events as ``(seconds since started_at, text)``, in time order."""
    return [(round(at - started_at, 3), text) for at, text in sorted(stamped, key=lambda item: item[0])]


def texml_heard(result: Any, audio: bytes, started_at: float = 0.0) -> HeardCall:
    """A :class:`~app.devtools.simulator.telnyx.TexmlCallResult` as a :class:`HeardCall` (``started_at``: when the
    call was placed, wall clock)."""
    # What the TeXML result keeps without a time (its order is the call's), then the legs' stamped events.
    timeline = [(0.0, f"(untimed) voice webhook -> {result.webhook_status}")]
    timeline += [(0.0, f"(untimed) said: {text[:80]}") for text in result.said]
    timeline += [(0.0, f"(untimed) dialled: {number}") for number in result.dialled]
    for leg in result.legs:
        timeline.append((0.0, f"(untimed) stream: heard {len(leg.heard)} bytes, marks {len(leg.marks_received)}, "
                              f"server closed first {leg.server_closed_first} (code {leg.close_code}), "
                              f"errors {leg.protocol_errors[:3]}"))
    timeline += [(0.0, f"(untimed) callback {url.rsplit('/', 1)[-1]} -> {status}") for url, status in result.callbacks]
    timeline += [(0.0, f"(untimed) error: {error}") for error in result.errors]
    if started_at:
        timeline += _timeline(started_at, [(at, f"stream {n + 1}: {text}") for n, leg in enumerate(result.legs)
                                           for at, text in leg.events])
    return HeardCall(call_sid=result.call_sid, heard_audio=result.heard, said=list(result.said),
                     streams=len(result.legs), sent_audio=audio, timeline=timeline,
                     custom_parameters=dict(result.custom_parameters), stranded=False,
                     waits=[leg.wait for leg in result.legs if leg.wait is not None], started_at=started_at)


class TelnyxChaos:
    """Places TeXML and Call Control calls for the chaos run.

    ``bridges`` are the bridge instances' URLs (TeXML webhooks go to any; the fake Telnyx posts each Call Control
    call's webhooks to one of them), ``public_url`` the one PUBLIC_URL they share.
    """

    def __init__(self, bridges: list[str], public_url: str, fake_url: str, signer: TelnyxSigner,
                 choose: Callable[[list[str]], str], kill_relay: Callable[[str, Callable[[], bool]], None],
                 drop_kallglot: Callable[[str, str], None], listen_seconds: float,
                 patience_seconds: float = DEFAULT_PATIENCE_SECONDS) -> None:
        self.bridges, self.public_url, self.fake_url, self.signer = bridges, public_url, fake_url, signer
        self.choose, self.kill_relay, self.drop_kallglot = choose, kill_relay, drop_kallglot
        self.listen_seconds, self.patience_seconds = listen_seconds, patience_seconds

    # ----- TeXML -------------------------------------------------------------------------------------------
    def texml(self, scenario: str, to: str, caller: str, audio: bytes, choice: str) -> list[HeardCall]:
        """One TeXML caller under ``scenario`` (``returning``: two calls); ``choice`` picks a callback order."""
        call: dict[str, Any] = dict(listen_seconds=self.listen_seconds, pace=True, restore_audio=audio[:1600],
                                    patience_seconds=self.patience_seconds)
        if scenario == "callbacks":
            call["callbacks"] = choice
        elif scenario in ("caller-drop", "returning"):
            # Like every caller: paced, patient, and "hello?" on a stream restored before they dropped.
            first = self._texml_call(to, caller, audio, callbacks="none", listen_seconds=0,
                                     hold_open=self._vanish, **{k: v for k, v in call.items() if k != "listen_seconds"})
            if scenario == "caller-drop":
                return [first]
            time.sleep(0.5)  # the relay notices the drop and holds the session
            return [first, self._texml_call(to, caller, audio, **call)]
        elif scenario == "kallglot-drop":
            call["hold_open"] = lambda leg: self._texml_drop_kallglot(leg)
        elif scenario == "worker-kill":
            call["hold_open"] = lambda leg: self.kill_relay(
                leg.call_control_id, lambda: leg.wait_for(lambda r: r.server_closed_first, 5))
        elif scenario == "agent":
            call["listen_seconds"] = max(1.5, self.listen_seconds)
        return [self._texml_call(to, caller, audio, **call)]

    def _texml_call(self, to: str, caller: str, audio: bytes, **options: Any) -> HeardCall:
        # One simulator per call: calls run concurrently and the simulator keeps per-call options.
        simulator = TexmlCallSimulator(self.choose(self.bridges), self.signer, public_url=self.public_url,
                                       timeout=15)
        started_at = time.time()
        # The application configured as README says: its failover URL answers when the voice webhook fails.
        return texml_heard(simulator.place_call(to, caller, audio, call_sid=new_call_control_id(),
                                                fallback_url=self.public_url + "/telnyx/texml/fallback", **options),
                           audio, started_at)

    def _vanish(self, leg: TelnyxMediaLeg) -> None:
        # Drops once the call got going (they heard something), or after their whole patience in silence
        # (then it counts as dead air, as it should); the wait is measured from the end of their talking.
        leg.await_answer(time.time(), self.patience_seconds)
        time.sleep(0.3)
        leg.close_abruptly()

    def _texml_drop_kallglot(self, leg: TelnyxMediaLeg) -> None:
        leg.wait_for(lambda r: bool(r.heard), self.patience_seconds)
        self.drop_kallglot("telnyx", leg.call_control_id)
        time.sleep(0.6)

    # ----- Call Control ------------------------------------------------------------------------------------
    def call_control(self, scenario: str, to: str, caller: str, audio: bytes, choice: str) -> list[HeardCall]:
        """One Call Control caller under ``scenario`` (``returning``: two calls)."""
        call: dict[str, Any] = {"listen_seconds": self.listen_seconds, "pace": True,
                                "patience_seconds": self.patience_seconds,
                                "restore_payload": base64.b64encode(audio[:1600]).decode()}
        if scenario == "callbacks":
            call["duplicate_webhooks" if choice == "twice" else "reverse_final_webhooks"] = True
        elif scenario in ("caller-drop", "returning"):
            first = self._call_control_call(to, caller, audio, vanish=True,
                                            **{k: v for k, v in call.items() if k != "listen_seconds"})
            if scenario == "caller-drop":
                return [first]
            time.sleep(0.5)
            return [first, self._call_control_call(to, caller, audio, **call)]
        elif scenario in ("kallglot-drop", "worker-kill", "agent"):
            call["listen_seconds"] = max(2.5, self.listen_seconds)
        return [self._call_control_call(to, caller, audio, during=scenario, **call)]

    def _call_control_call(self, to: str, caller: str, audio: bytes, *, during: str = "",
                           **scenario: Any) -> HeardCall:
        body = {"to": to, "from": caller, "payload": base64.b64encode(audio).decode(),
                "webhook_url": self.choose(self.bridges) + "/telnyx/call-control", **scenario}
        started_at = time.time()
        call_id = str(requests.post(self.fake_url + "/_fake/calls", json=body, timeout=15).json()["call_control_id"])
        if during == "kallglot-drop":
            time.sleep(0.8)  # answered, streaming and heard back by now (or the drop finds nothing: harmless)
            self.drop_kallglot("telnyx", call_id)
        elif during == "worker-kill":
            self.kill_relay(call_id, lambda: self._streams_at_least(call_id, 2, 8))
        deadline = time.monotonic() + CALL_CONTROL_CALL_SECONDS
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            view = self._view(call_id)
            vanished = scenario.get("vanish") and view.get("hung_up")
            if vanished or (view.get("hung_up") and any(w["event"] == "call.hangup" for w in view["webhooks"])):
                break
            time.sleep(0.2)
        return self._heard(call_id, view, audio, stranded=time.monotonic() >= deadline, started_at=started_at)

    def _streams_at_least(self, call_id: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._view(call_id).get("streams", 0) >= count:
                return True
            time.sleep(0.1)
        return False

    def _view(self, call_id: str) -> dict[str, Any]:
        try:
            return dict(requests.get(f"{self.fake_url}/_fake/calls/{call_id}", timeout=15).json())
        except (requests.RequestException, ValueError):
            return {}

    @staticmethod
    def _heard(call_id: str, view: dict[str, Any], audio: bytes, *, stranded: bool,
               started_at: float = 0.0) -> HeardCall:
        stamped = [(float(w.get("at") or started_at), f"webhook {w['event']} -> {w['status']}")
                   for w in view.get("webhooks", [])]
        stamped += [(float(c.get("at") or started_at), f"command {c['action']}") for c in view.get("commands", [])]
        stamped += [(float(at), f"stream: {text}") for at, text in view.get("events", [])]
        timeline = _timeline(started_at, stamped) if started_at else [(0.0, text) for _, text in stamped]
        timeline += [(0.0, f"spoken: {text[:80]}") for text in view.get("spoken", [])]
        timeline += [(0.0, f"protocol error: {e}") for e in view.get("protocol_errors", [])[:3]]
        if stranded:
            timeline.append((0.0, f"still up after {CALL_CONTROL_CALL_SECONDS:.0f}s: the caller gave up"))
        return HeardCall(call_sid=call_id, heard_audio=base64.b64decode(view.get("heard") or ""),
                         said=list(view.get("spoken", [])), streams=int(view.get("streams", 0)), sent_audio=audio,
                         timeline=timeline, stranded=stranded, started_at=started_at,
                         waits=[StreamWait.from_dict(w) for w in view.get("waits", [])])


def telnyx_bridge_env(fake_url: str, signer: TelnyxSigner) -> dict[str, str]:
    """The settings that put a chaos bridge on the fake Telnyx."""
    return {"TELNYX_PUBLIC_KEY": signer.public_key, "TELNYX_API_KEY": FAKE_API_KEY,
            "TELNYX_API_URL": fake_url + "/v2", "TELNYX_CONNECTION_ID": CONNECTION_ID}


def fake_telnyx_env(webhook_url: str, signer: TelnyxSigner) -> dict[str, str]:
    """The fake Telnyx's settings (its default webhook URL; each chaos call names its own bridge)."""
    return {"FAKE_TELNYX_WEBHOOK_URL": webhook_url, "FAKE_TELNYX_SIGNING_SEED": signer.seed_b64,
            "FAKE_TELNYX_API_KEY": FAKE_API_KEY}


def parse_modes(value: str) -> tuple[str, ...]:
    """``--carriers twilio,texml,call-control`` as a tuple of modes (argparse type)."""
    modes = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown carriers {unknown}; choose from {', '.join(MODES)}")
    return modes
