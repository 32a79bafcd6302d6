"""The emulator refuses on the direct and SIP paths what Kallglot refuses on a connect: a carrier stream with a
wrong or missing token, another session's token, audio Kallglot cannot take; a SIP dial to an unknown domain,
to a session not created with SIP routing, or to an ended one."""
from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import requests
from simple_websocket import ConnectionClosed

from app.devtools.simulator.websocket import TimedClient
from tests.support.controls import EmulatorControl
from tests.support.settings import EMULATOR_API_KEY

AUTH = {"Authorization": f"Bearer {EMULATOR_API_KEY}"}


def create(emulator: EmulatorControl, **routing: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"mode": "bidirectional_translation", **({"routing": routing} if routing else {})}
    response = requests.post(emulator.api_url + "/sessions", json=body, headers=AUTH, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()


def close_code(ws: TimedClient) -> int:
    deadline = time.monotonic() + 8
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            ws.receive(timeout=0.5)
    return closed.value.reason


def twilio_start(token: str, session_id: str, encoding: str = "audio/x-mulaw") -> list[str]:
    return [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ" + "0" * 32, "start": {
                "streamSid": "MZ" + "0" * 32, "callSid": "CA" + "0" * 32, "tracks": ["inbound"],
                "customParameters": {"token": token, "session_id": session_id},
                "mediaFormat": {"encoding": encoding, "sampleRate": 8000, "channels": 1}}})]


@pytest.mark.parametrize("case", ["forged", "other_session", "alaw"])
def test_direct_carrier_streams_kallglot_would_refuse_are_closed(emulator: EmulatorControl, case: str) -> None:
    session, other = create(emulator), create(emulator)
    token = {"forged": "kst_test_forged", "other_session": other["stream"]["token"]}.get(case,
                                                                                       session["stream"]["token"])
    ws = TimedClient(session["stream"]["url"], {}, 5)
    for frame in twilio_start(token, session["id"], "audio/x-alaw" if case == "alaw" else "audio/x-mulaw"):
        ws.send(frame)
    assert close_code(ws) == (1003 if case == "alaw" else 1008)
    view = emulator.session(session["id"])
    assert view["errors_sent"] == ["invalid_audio_format" if case == "alaw" else "invalid_token"]
    assert view["audio_input_messages"] == {}


def test_direct_twilio_stream_is_recorded_and_echoed_in_twilios_own_frames(emulator: EmulatorControl) -> None:
    session = create(emulator)
    ws = TimedClient(session["stream"]["url"], {}, 5)
    for frame in twilio_start(session["stream"]["token"], session["id"]):
        ws.send(frame)
    audio = bytes(range(160))
    ws.send(json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": "MZ" + "0" * 32,
                        "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                                  "payload": base64.b64encode(audio).decode()}}))
    echo = json.loads(ws.receive(timeout=5))
    assert echo == {"event": "media", "media": {"payload": base64.b64encode(audio).decode()},
                    "streamSid": "MZ" + "0" * 32}
    ws.send(json.dumps({"event": "stop", "sequenceNumber": "3", "streamSid": "MZ" + "0" * 32,
                        "stop": {"callSid": "CA" + "0" * 32}}))
    assert close_code(ws) == 1000
    view = emulator.session(session["id"])
    assert base64.b64decode(view["audio_received"]["customer"]) == audio and view["status"] == "active"


def sip_invite(emulator: EmulatorControl, uri: str) -> requests.Response:
    return requests.post(emulator.url + "/_emulator/sip/invite", json={"uri": uri, "from": "+15551230000"},
                         timeout=5)


def test_sip_dials_are_answered_only_for_this_domain_and_sip_routed_running_sessions(
        emulator: EmulatorControl) -> None:
    domain = emulator.url.split("//", 1)[1]
    sip, phone = create(emulator, type="sip"), create(emulator, phone_number="+15005550006")
    assert sip_invite(emulator, f"sip:{sip['id']}@sip.example.net").json()["sip_status"] == 404
    assert sip_invite(emulator, f"sip:sess_UNKNOWN@{domain}").json()["sip_status"] == 404
    assert sip_invite(emulator, f"sip:{phone['id']}@{domain}").json()["sip_status"] == 403
    answered = sip_invite(emulator, f"sip:{sip['id']}@{domain}").json()
    assert answered["sip_status"] == 200 and answered["leg_id"]
    requests.post(f"{emulator.api_url}/sessions/{sip['id']}/end", headers=AUTH, timeout=5).raise_for_status()
    assert sip_invite(emulator, f"sip:{sip['id']}@{domain}").json()["sip_status"] == 480
    bye = requests.post(emulator.url + "/_emulator/sip/bye", json={"leg_id": answered["leg_id"]}, timeout=5).json()
    assert bye["session_ended_first"] is True
    (leg,) = emulator.session(sip["id"])["sip_legs"]
    assert leg["ended_at"] is not None
