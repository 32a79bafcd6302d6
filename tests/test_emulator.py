"""Tests of the Kallglot emulator itself: REST through Flask's test client, the stream over real sockets."""
from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from simple_websocket import Client, ConnectionClosed

from app.devtools.emulator import create_emulator_app
from app.devtools.emulator.state import EmulatorState, StreamConnection
from tests.support.servers import REPO_ROOT, free_port, run_gunicorn, wait_for_http

API_KEY = "sk_test_unit"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def app() -> Flask:
    return create_emulator_app({"KALLGLOT_EMULATOR_API_KEY": API_KEY})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def state_of(app: Flask) -> EmulatorState:
    return app.extensions["kallglot_emulator"]


def create(client: FlaskClient, body: dict[str, Any] | None = None, **headers: str) -> Any:
    return client.post("/v1/sessions", json=body or {"mode": "bidirectional_translation"},
                       headers={**AUTH, **headers})


def mulaw_message(data: bytes, sequence: int, speaker: str = "customer", **audio: Any) -> str:
    fields = {"encoding": "mulaw", "sample_rate_hz": 8000, "payload": base64.b64encode(data).decode(), **audio}
    return json.dumps({"type": "audio.input", "sequence": sequence, "timestamp_ms": 0, "speaker": speaker,
                       "audio": fields})


# --- REST -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk_test_wrong"}, {"X-API-Key": "nope"},
                                     {"Authorization": API_KEY}])
def test_bad_or_missing_api_key_is_401(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.post("/v1/sessions", json={"mode": "ai_agent"}, headers=headers)
    assert response.status_code == 401
    error = response.json["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert error["request_id"] == response.headers["X-Request-ID"]


def test_create_returns_documented_shape(client: FlaskClient) -> None:
    response = create(client, {"mode": "ai_agent", "source_language": "de", "target_language": "en",
                               "routing": {"phone_number": "+14155551234"}, "metadata": {"call": "CA1"}})
    assert response.status_code == 201
    assert response.headers["X-Request-ID"].startswith("req_")
    body = response.json
    assert re.fullmatch(r"sess_[A-Z0-9]{26}", body["id"])
    assert body["object"] == "session" and body["status"] == "created" and body["mode"] == "ai_agent"
    assert (body["provider"], body["phone_number"]) == ("twilio", "+14155551234")
    assert (body["source_language"], body["target_language"]) == ("de", "en")
    assert body["recording"] == {"enabled": False} and body["call"] is None
    assert body["metadata"] == {"call": "CA1"}
    stream = body["stream"]
    assert stream["url"] == f"ws://localhost/v1/sessions/{body['id']}/connect"
    assert stream["token"].startswith("kst_test_")
    expires = datetime.strptime(stream["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(expires - datetime.now(timezone.utc) - timedelta(seconds=300)) < timedelta(seconds=5)


def test_x_api_key_header_and_no_routing(client: FlaskClient) -> None:
    response = client.post("/v1/sessions", json={"mode": "help_chat_voice"}, headers={"X-API-Key": API_KEY})
    assert response.status_code == 201
    assert response.json["provider"] is None and response.json["phone_number"] is None


def test_stream_url_scheme_and_public_url() -> None:
    app = create_emulator_app({"KALLGLOT_EMULATOR_API_KEY": API_KEY})
    secure = app.test_client().post("/v1/sessions", json={"mode": "ai_agent"}, headers=AUTH,
                                    base_url="https://kg.example:8443")
    assert secure.json["stream"]["url"].startswith("wss://kg.example:8443/v1/sessions/")
    app = create_emulator_app({"KALLGLOT_EMULATOR_API_KEY": API_KEY,
                               "KALLGLOT_EMULATOR_PUBLIC_URL": "http://127.0.0.1:8765/"})
    body = create(app.test_client()).json
    assert body["stream"]["url"] == f"ws://127.0.0.1:8765/v1/sessions/{body['id']}/connect"


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({}, 422, "missing_required_field", "mode"),
    ({"mode": "translation"}, 422, "invalid_mode", "mode"),
    ({"mode": "ai_agent", "source_language": "xx"}, 422, "invalid_language_code", "source_language"),
    ({"mode": "ai_agent", "target_language": "english"}, 422, "invalid_language_code", "target_language"),
    ({"mode": "ai_agent", "routing": {"phone_number": "+14155551234", "connection_id": "pcon_1"}},
     422, "invalid_field_value", "routing"),
    ({"mode": "ai_agent", "routing": {"type": "sip", "connection_id": "pcon_1"}}, 422, "invalid_field_value",
     "routing"),
    ({"mode": "ai_agent", "routing": {"phone_number": "4155551234"}}, 422, "invalid_field_value",
     "routing.phone_number"),
    ({"mode": "ai_agent", "routing": {"type": "pstn"}}, 422, "invalid_field_value", "routing.type"),
    ({"mode": "ai_agent", "routing": "twilio"}, 422, "invalid_field_value", "routing"),
    ({"mode": "ai_agent", "metadata": ["a"]}, 422, "invalid_field_value", "metadata"),
    ({"mode": "ai_agent", "provider": {"type": "twilio", "call_sid": "CA1"}}, 400, "invalid_provider", "provider"),
])
def test_create_validation(client: FlaskClient, body: dict[str, Any], status: int, code: str, param: str) -> None:
    response = client.post("/v1/sessions", json=body, headers=AUTH)
    assert response.status_code == status
    error = response.json["error"]
    assert (error["type"], error["code"], error["param"]) == ("validation_error", code, param)
    assert state_of(client.application).stats()["created"] == 0


def test_create_rejects_non_json(client: FlaskClient) -> None:
    for data in (b"mode=ai_agent", b"", b"[1]"):
        response = client.post("/v1/sessions", data=data, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json["error"]["code"] == "invalid_request"


def test_routing_methods_pick_provider(client: FlaskClient) -> None:
    assert create(client, {"mode": "ai_agent", "routing": {"type": "sip"}}).json["provider"] == "sip"
    assert create(client, {"mode": "ai_agent", "routing": {"connection_id": "pcon_telnyx_1"}}).json["provider"] \
        == "telnyx"


def test_idempotency_replays_first_response(client: FlaskClient) -> None:
    body = {"mode": "ai_agent", "metadata": {"a": 1, "b": 2}}
    first = create(client, body, **{"Idempotency-Key": "call-CA1"})
    again = client.post("/v1/sessions", headers={**AUTH, "Idempotency-Key": "call-CA1"},
                        json={"metadata": {"b": 2, "a": 1}, "mode": "ai_agent"})  # same body, other key order
    assert (again.status_code, again.get_data()) == (first.status_code, first.get_data())
    assert state_of(client.application).stats()["created"] == 1
    session = client.get(f"/_emulator/sessions/{first.json['id']}").json
    assert session["idempotency_key"] == "call-CA1"

    mismatch = create(client, {"mode": "assistive_translation"}, **{"Idempotency-Key": "call-CA1"})
    assert mismatch.status_code == 400
    assert (mismatch.json["error"]["type"], mismatch.json["error"]["code"]) == \
        ("invalid_request_error", "idempotency_mismatch")


def test_idempotency_keys_are_scoped_to_the_api_key() -> None:
    state = EmulatorState(api_key="k", token_ttl_seconds=300)
    assert state.idempotency_begin(("key_a", "K"), "body") == "new"
    assert state.idempotency_begin(("key_b", "K"), "other body") == "new"
    assert state.idempotency_begin(("key_a", "K"), "other body") == "mismatch"


def test_idempotency_conflict_while_first_request_runs(app: Flask) -> None:
    state = state_of(app)
    app.test_client().post("/_emulator/faults", json={"faults": [{"endpoint": "create", "delay_seconds": 0.5}]})
    results: list[Any] = []
    slow = threading.Thread(target=lambda: results.append(create(app.test_client(), **{"Idempotency-Key": "K"})))
    slow.start()
    deadline = time.monotonic() + 5
    while not state.idempotency and time.monotonic() < deadline:
        time.sleep(0.01)
    conflict = create(app.test_client(), **{"Idempotency-Key": "K"})
    slow.join(timeout=5)
    assert conflict.status_code == 409 and conflict.headers["Retry-After"] == "1"
    assert conflict.json["error"]["code"] == "idempotency_conflict"
    assert results[0].status_code == 201
    replay = create(app.test_client(), **{"Idempotency-Key": "K"})
    assert replay.get_data() == results[0].get_data()


def test_get_mints_fresh_token_and_404s(client: FlaskClient) -> None:
    created = create(client).json
    fetched = client.get(f"/v1/sessions/{created['id']}", headers=AUTH)
    assert fetched.status_code == 200
    body = fetched.json
    assert body["status"] == "created" and body["started_at"] is None and body["ended_at"] is None
    assert body["stream"]["token"] != created["stream"]["token"]
    assert body["stream"]["url"] == created["stream"]["url"]
    # Both tokens stay usable until their own expiry.
    state = state_of(client.application)
    for token in (created["stream"]["token"], body["stream"]["token"]):
        assert state.attach(created["id"], token, StreamConnection(ws=None, session_id=created["id"])) is None
    missing = client.get("/v1/sessions/sess_NOPE", headers=AUTH)
    assert missing.status_code == 404
    assert (missing.json["error"]["type"], missing.json["error"]["code"]) == ("invalid_request_error", "not_found")


def test_expired_or_foreign_tokens_are_refused() -> None:
    app = create_emulator_app({"KALLGLOT_EMULATOR_API_KEY": API_KEY, "KALLGLOT_EMULATOR_STREAM_TOKEN_TTL": "0"})
    state = state_of(app)
    one, two = create(app.test_client()).json, create(app.test_client()).json
    probe = StreamConnection(ws=None, session_id=one["id"])
    assert state.attach(one["id"], one["stream"]["token"], probe) == "invalid_token"  # TTL 0: already expired
    state.token_ttl_seconds = 300
    assert state.attach(one["id"], two["stream"]["token"], probe) == "invalid_token"
    assert state.attach(one["id"], "", probe) == "invalid_token"
    assert state.attach("sess_NOPE", one["stream"]["token"], probe) == "session_not_found"


def test_end_is_idempotent_and_counted(client: FlaskClient) -> None:
    session_id = create(client).json["id"]
    first = client.post(f"/v1/sessions/{session_id}/end", headers=AUTH)
    assert first.status_code == 200
    assert set(first.json) == {"id", "object", "status", "duration_seconds", "ended_at"}
    assert first.json["status"] == "ended" and isinstance(first.json["duration_seconds"], float)
    second = client.post(f"/v1/sessions/{session_id}/end", headers=AUTH)
    assert second.json == first.json
    fetched = client.get(f"/v1/sessions/{session_id}", headers=AUTH).json
    assert fetched["status"] == "ended" and fetched["ended_at"] == first.json["ended_at"]
    assert "stream" not in fetched
    assert client.get(f"/_emulator/sessions/{session_id}").json["end_calls"] == 2
    stats = client.get("/_emulator/stats").json
    assert stats == {"created": 1, "ended": 1, "active": 0, "end_calls": 2, "double_end_calls": 1,
                     "connections_live": 0}
    assert client.post("/v1/sessions/sess_NOPE/end", headers=AUTH).status_code == 404


def test_end_honours_idempotency_key(client: FlaskClient) -> None:
    session_id = create(client).json["id"]
    first = client.post(f"/v1/sessions/{session_id}/end", headers={**AUTH, "Idempotency-Key": "end-1"})
    replay = client.post(f"/v1/sessions/{session_id}/end", headers={**AUTH, "Idempotency-Key": "end-1"})
    assert replay.get_data() == first.get_data() and replay.headers["Idempotent-Replayed"] == "true"


def test_faults_answer_errors_then_clear(client: FlaskClient) -> None:
    queued = client.post("/_emulator/faults", json={"faults": [
        {"endpoint": "create", "status": 503, "retry_after": 2, "times": 2},
        {"endpoint": "get", "status": 429, "code": "rate_limit_exceeded", "type": "rate_limit_error"},
    ]})
    assert len(queued.json["faults"]) == 2
    for _ in range(2):
        failed = create(client, **{"Idempotency-Key": "retry-me"})
        assert failed.status_code == 503 and failed.headers["Retry-After"] == "2"
        assert failed.json["error"]["code"] == "service_unavailable" and failed.json["error"]["type"] == "api_error"
    # A faulted attempt is not remembered: the retry with the same key really runs.
    ok = create(client, **{"Idempotency-Key": "retry-me"})
    assert ok.status_code == 201
    limited = client.get(f"/v1/sessions/{ok.json['id']}", headers=AUTH)
    assert limited.status_code == 429 and limited.json["error"]["code"] == "rate_limit_exceeded"
    assert client.get(f"/v1/sessions/{ok.json['id']}", headers=AUTH).status_code == 200

    client.post("/_emulator/faults", json={"faults": [{"endpoint": "end", "status": 500}]})
    assert client.delete("/_emulator/faults").json == {"faults": []}
    assert client.post(f"/v1/sessions/{ok.json['id']}/end", headers=AUTH).status_code == 200
    assert client.post("/_emulator/faults", json={"faults": [{"endpoint": "nope"}]}).status_code == 400


def test_delay_fault_then_proceeds(app: Flask, client: FlaskClient) -> None:
    delays: list[float] = []
    state_of(app).pause = delays.append  # record the delay the fault imposes instead of waiting it out
    client.post("/_emulator/faults", json={"faults": [{"endpoint": "create", "delay_seconds": 0.2}]})
    assert create(client).status_code == 201
    assert delays == [0.2]  # delayed once, by the fault's own amount, then answered normally
    assert create(client, {"mode": "ai_agent"}).status_code == 201 and delays == [0.2]  # consumed
    assert client.get("/_emulator/faults").json == {"faults": []}


def test_a_delayed_request_that_outlives_a_reset_changes_nothing(app: Flask, client: FlaskClient) -> None:
    # A test's slow create (client timed out, emulator still waiting) must not land in the next test's state.
    state = state_of(app)
    state.pause = lambda seconds: state.reset()  # the next test's reset comes while this request waits
    client.post("/_emulator/faults", json={"faults": [{"endpoint": "create", "delay_seconds": 3}]})
    late = create(client, {"mode": "ai_agent"}, **{"Idempotency-Key": "slow-create"})
    assert late.status_code == 503 and late.json["error"]["code"] == "emulator_reset"
    assert client.get("/_emulator/sessions").json["sessions"] == []
    assert create(client, {"mode": "ai_agent"}, **{"Idempotency-Key": "slow-create"}).status_code == 201


def test_control_api(client: FlaskClient) -> None:
    session_id = create(client, {"mode": "ai_agent", "routing": {"connection_id": "pcon_1"}}).json["id"]
    listed = client.get("/_emulator/sessions").json["sessions"]
    assert [s["id"] for s in listed] == [session_id]
    view = listed[0]
    assert view["routing"] == {"connection_id": "pcon_1"} and view["end_calls"] == 0
    assert view["connections_live"] == 0 and view["connections_total"] == 0
    assert view["audio_received"] == {} and view["sequences_increasing"] is True and view["errors_sent"] == []
    assert client.get("/_emulator/sessions/sess_NOPE").status_code == 404
    assert client.post("/_emulator/behaviour", json={"behaviour": "silent"}).json == {"behaviour": "silent"}
    assert client.post("/_emulator/behaviour", json={"behaviour": "loud"}).status_code == 400
    assert client.post(f"/_emulator/sessions/{session_id}/send", json={"messages": [{"type": "x"}]}).json \
        == {"connections": 0}
    client.post("/_emulator/faults", json={"faults": [{"endpoint": "create", "status": 503}]})
    assert client.post("/_emulator/reset").status_code == 200
    assert client.get("/_emulator/sessions").json == {"sessions": []}
    assert client.get("/_emulator/faults").json == {"faults": []}
    assert state_of(client.application).behaviour == "echo"


# --- stream WebSocket over a real gunicorn + gevent server --------------------------------------------


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[str]:
    env = {"KALLGLOT_EMULATOR_API_KEY": API_KEY, "KALLGLOT_EMULATOR_PUBLIC_URL": ""}
    with run_gunicorn("app.devtools.emulator:create_emulator_app()", env=env, ready_path="/_emulator/stats") as server:
        yield server.url


@pytest.fixture
def base_url(emulator_server: str) -> str:
    requests.post(emulator_server + "/_emulator/reset", timeout=5).raise_for_status()
    return emulator_server


def new_session(base_url: str, **body: Any) -> dict[str, Any]:
    response = requests.post(base_url + "/v1/sessions", json={"mode": "bidirectional_translation", **body},
                             headers=AUTH, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()


def control(base_url: str, session_id: str) -> dict[str, Any]:
    return requests.get(f"{base_url}/_emulator/sessions/{session_id}", timeout=5).json()


class StreamClient(Client):
    """simple-websocket 1.1's Client with one fix: frames that arrive in the same read as the 101 response.

    Its handshake takes only the first wsproto event, so a frame the server sends right after accepting
    (``session.ready``, or ``session.error`` + close) stays buffered until more bytes arrive. Under load
    that made the first receive time out. Draining the pending events before the read loop fixes it.
    """

    def _thread(self) -> None:
        self.connected = self._handle_events()
        super()._thread()


@contextlib.contextmanager
def open_stream(url: str) -> Iterator[Client]:
    ws = StreamClient.connect(url)
    try:
        yield ws
    finally:
        with contextlib.suppress(ConnectionClosed):
            ws.close()


def connect(session: dict[str, Any]) -> contextlib.AbstractContextManager[Client]:
    return open_stream(f"{session['stream']['url']}?token={session['stream']['token']}")


def receive(ws: Client) -> dict[str, Any]:
    frame = ws.receive(timeout=5)
    assert frame is not None, "no message within 5 s"
    return json.loads(frame)


def expect_close(ws: Client) -> int:
    """Read until the server closes; return the close code (1005 when the socket was just cut)."""
    deadline = time.monotonic() + 5
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            ws.receive(timeout=0.5)
    return closed.value.reason


def wait_for(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached within 5 s"
        time.sleep(0.02)


def test_stream_url_comes_from_request_host(base_url: str) -> None:
    session = new_session(base_url)
    assert session["stream"]["url"] == f"{base_url.replace('http', 'ws')}/v1/sessions/{session['id']}/connect"


@pytest.mark.parametrize("case", ["bad_token", "no_token", "unknown_session"])
def test_bad_connect_is_refused_with_1008(base_url: str, case: str) -> None:
    session = new_session(base_url)
    url = session["stream"]["url"]
    url = {"bad_token": url + "?token=kst_test_forged", "no_token": url,
           "unknown_session": url.replace(session["id"], "sess_UNKNOWN") + "?token=" + session["stream"]["token"]}[case]
    with open_stream(url) as ws:
        error = receive(ws)
        assert error["type"] == "session.error"
        assert error["code"] == ("session_not_found" if case == "unknown_session" else "invalid_token")
        assert expect_close(ws) == 1008
    assert control(base_url, session["id"])["status"] == "created"


def test_ready_then_echo_byte_exact_with_transcripts(base_url: str) -> None:
    session = new_session(base_url, source_language="de", target_language="fr")
    chunks = [bytes((i * 7 + n) % 256 for n in range(1600)) for i in range(6)]  # 9600 bytes = 1.2 s
    with connect(session) as ws:
        assert receive(ws) == {"type": "session.ready", "session_id": session["id"]}
        status = requests.get(f"{base_url}/v1/sessions/{session['id']}", headers=AUTH, timeout=5).json()
        assert status["status"] == "active" and status["started_at"] is not None
        received: list[dict[str, Any]] = []
        for sequence, chunk in enumerate(chunks, start=1):
            ws.send(mulaw_message(chunk, sequence))
        while len([m for m in received if m["type"] == "audio.output"]) < len(chunks):
            received.append(receive(ws))
        outputs = [m for m in received if m["type"] == "audio.output"]
        assert [m["sequence"] for m in outputs] == [1, 2, 3, 4, 5, 6]
        assert all(m["audio"]["encoding"] == "mulaw" and m["audio"]["sample_rate_hz"] == 8000 for m in outputs)
        assert b"".join(base64.b64decode(m["audio"]["payload"]) for m in outputs) == b"".join(chunks)
        transcripts = [m for m in received if m["type"] == "transcript.final"]
        assert transcripts == [{"type": "transcript.final", "id": "utt_customer_1", "speaker": "customer",
                                "language": "de", "text": "(emulated utterance 1)",
                                "translation": {"language": "fr", "text": "(traducción 1)"}}]
        # The next second's partial opens at once, under the id its final will replace it with.
        partials = [m for m in received if m["type"] == "transcript.partial"]
        assert [(m["id"], m["speaker"]) for m in partials] in ([], [("utt_customer_2", "customer")])
    view = control(base_url, session["id"])
    assert base64.b64decode(view["audio_received"]["customer"]) == b"".join(chunks)
    assert view["audio_input_messages"] == {"customer": 6}
    assert view["audio_sequences"] == {"customer": [1, 2, 3, 4, 5, 6]}
    assert view["sequences_increasing"] is True and view["connections_total"] == 1


def test_two_legs_and_silent_behaviour(base_url: str) -> None:
    requests.post(base_url + "/_emulator/behaviour", json={"behaviour": "silent"}, timeout=5)
    session = new_session(base_url)
    with connect(session) as customer, connect(session) as agent:
        assert receive(customer)["type"] == receive(agent)["type"] == "session.ready"
        agent.send(mulaw_message(b"\x7f" * 8000, 5, speaker="agent"))
        assert receive(agent)["type"] == "transcript.final"  # no audio.output when silent
        assert receive(agent)["type"] == "transcript.partial"  # the next second's, opened at once
        agent.send(mulaw_message(b"\x7f" * 10, 4, speaker="agent"))  # sequence went backwards
        customer.send(json.dumps({"type": "ping"}))
        assert receive(customer)["type"] == "pong"
        wait_for(lambda: control(base_url, session["id"])["audio_input_messages"].get("agent") == 2)
        view = control(base_url, session["id"])
        assert view["connections_live"] == 2 and view["sequences_increasing"] is False
        assert agent.receive(timeout=0.1) is None


@pytest.mark.parametrize(("frame", "code"), [
    (mulaw_message(b"abc", 1, encoding="pcm_16"), "invalid_audio_format"),
    (mulaw_message(b"abc", 1, sample_rate_hz=16000), "invalid_audio_format"),
    (mulaw_message(b"abc", 1, payload="not base64!"), "invalid_audio_format"),
    (mulaw_message(b"abc", 1, speaker="caller"), "invalid_audio_format"),
    (json.dumps({"type": "audio.input", "speaker": "customer", "sequence": "1",
                 "audio": {"encoding": "mulaw", "sample_rate_hz": 8000, "payload": ""}}), "invalid_audio_format"),
    ("{not json", "invalid_message"),
    (b"\x00\x01", "invalid_message"),
    (json.dumps({"type": "control", "action": "mute"}), "unknown_message_type"),
])
def test_bad_client_messages_get_session_error_and_stay_open(base_url: str, frame: str | bytes, code: str) -> None:
    session = new_session(base_url)
    with connect(session) as ws:
        receive(ws)
        ws.send(frame)
        error = receive(ws)
        assert (error["type"], error["code"]) == ("session.error", code)
        ws.send(json.dumps({"type": "ping"}))
        assert receive(ws) == {"type": "pong", "session_id": session["id"]}
    view = control(base_url, session["id"])
    assert view["errors_sent"] == [code] and view["audio_input_messages"] == {}


def test_client_session_end(base_url: str) -> None:
    session = new_session(base_url)
    with connect(session) as ws:
        receive(ws)
        ws.send(json.dumps({"type": "session.end"}))
        assert receive(ws) == {"type": "session.ended", "session_id": session["id"], "reason": "explicit_end"}
        assert expect_close(ws) == 1000
    view = control(base_url, session["id"])
    assert view["status"] == "ended" and view["end_calls"] == 0 and view["end_reason"] == "explicit_end"
    with connect(session) as ws:
        assert receive(ws)["code"] == "session_ended"
        assert expect_close(ws) == 1008


def test_rest_end_closes_every_leg(base_url: str) -> None:
    session = new_session(base_url)
    with connect(session) as customer, connect(session) as agent:
        receive(customer), receive(agent)
        ended = requests.post(f"{base_url}/v1/sessions/{session['id']}/end", headers=AUTH, timeout=5)
        assert ended.status_code == 200
        for ws in (customer, agent):
            assert receive(ws) == {"type": "session.ended", "session_id": session["id"], "reason": "api_end"}
            assert expect_close(ws) == 1000
    wait_for(lambda: requests.get(base_url + "/_emulator/stats", timeout=5).json()["connections_live"] == 0)
    assert control(base_url, session["id"])["end_calls"] == 1


def test_send_control_pushes_raw_messages(base_url: str) -> None:
    session = new_session(base_url)
    injected = [{"type": "audio.output", "audio": {"encoding": "pcm16", "sample_rate_hz": 16000, "payload": "AAA="}},
                {"type": "audio.clear"}, {"type": "mystery.event", "x": 1}]
    with connect(session) as first, connect(session) as second:
        receive(first), receive(second)
        pushed = requests.post(f"{base_url}/_emulator/sessions/{session['id']}/send",
                               json={"messages": injected}, timeout=5)
        assert pushed.json() == {"connections": 2}
        for ws in (first, second):
            assert [receive(ws) for _ in injected] == injected


def test_drop_then_reconnect_with_fresh_token(base_url: str) -> None:
    session = new_session(base_url)
    with connect(session) as ws:
        receive(ws)
        dropped = requests.post(f"{base_url}/_emulator/sessions/{session['id']}/drop", timeout=5)
        assert dropped.json() == {"dropped": 1}
        assert expect_close(ws) == 1005  # no close frame, no session.ended
    fresh = requests.get(f"{base_url}/v1/sessions/{session['id']}", headers=AUTH, timeout=5).json()
    assert fresh["status"] == "active"
    with connect(fresh) as ws:
        assert receive(ws)["type"] == "session.ready"
    assert control(base_url, session["id"])["connections_total"] == 2


def test_connect_fault_closes_with_1011(base_url: str) -> None:
    session = new_session(base_url)
    requests.post(base_url + "/_emulator/faults", json={"faults": [{"endpoint": "connect", "status": 503}]},
                  timeout=5)
    with connect(session) as ws:
        assert receive(ws)["code"] == "service_unavailable"
        assert expect_close(ws) == 1011
    with connect(session) as ws:
        assert receive(ws)["type"] == "session.ready"


@pytest.mark.e2e  # starts a server process
def test_python_dash_m_runs_under_gevent() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.devtools.emulator", "--port", str(port), "--api-key", API_KEY],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/_emulator/stats", proc=proc)
        session = new_session(base)
        with connect(session) as ws:
            assert receive(ws)["type"] == "session.ready"
            ws.send(mulaw_message(b"\x01\x02\x03", 1))
            assert base64.b64decode(receive(ws)["audio"]["payload"]) == b"\x01\x02\x03"
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert f"listening on http://127.0.0.1:{port}" in output and API_KEY in output
