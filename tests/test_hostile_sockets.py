"""Issue 13 against the real server (gunicorn + gevent): chunked bodies, stalled sockets, bare media upgrades,
forged Telnyx ``start`` frames, replayed relay tokens."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
import redis as redis_lib
import requests
from simple_websocket import Client, ConnectionClosed

from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from app.redis_keys import RedisKeys
from tests.support.controls import EmulatorControl
from tests.support.numbers import new_numbers
from tests.support.server_log import closed_media_sockets, log_records
from tests.support.servers import REPO_ROOT, RunningServer, free_port, wait_for_http
from tests.support.settings import TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


def test_chunked_body_over_the_limit_is_refused(bridge_server: RunningServer) -> None:
    sent = 0

    def body():  # 2 MiB in 64 KiB chunks, no Content-Length: Transfer-Encoding: chunked
        nonlocal sent
        for _ in range(32):
            sent += 65536
            yield b"[" * 65536

    try:
        response = requests.post(bridge_server.url + "/kallglot/webhooks", data=body(), timeout=10,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text
    except requests.ConnectionError:
        pass  # the server may close the socket after its 413, while the client is still sending
    assert requests.get(bridge_server.url + "/healthz", timeout=5).status_code == 200


#: How long a test waits for the server to act on a stalled socket: far beyond the server's own timeouts (gunicorn's
#: keepalive, the relay's start timeout), so only a server that never acts fails, however loaded the machine.
STALL_WAIT_SECONDS = 60


def test_stalled_half_request_is_dropped(bridge_server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", bridge_server.port), timeout=STALL_WAIT_SECONDS) as stalled:
        stalled.sendall(b"GET /healthz HT")
        try:
            data = stalled.recv(1024)  # b"" when the server closes it
        except ConnectionResetError:
            data = b""  # dropped with a reset: dropped all the same
        except socket.timeout:
            data = b"timeout"
    assert data == b"", f"a stalled half request was held {STALL_WAIT_SECONDS} s, or answered: {data!r}"


def closed_for_no_start(ws: Client) -> tuple[int | None, str | None]:
    """Read until the server closes ``ws``; its close code and reason (the start timeout's: 1008 "no start event")."""
    with pytest.raises(ConnectionClosed):
        for _ in range(STALL_WAIT_SECONDS * 2):
            ws.receive(timeout=0.5)
    return ws.close_reason, ws.close_message


def test_bare_media_upgrade_is_closed_within_the_start_timeout(bridge_server: RunningServer) -> None:
    ws = Client.connect(bridge_server.url.replace("http", "ws") + "/telnyx/media")
    assert closed_for_no_start(ws) == (1008, "no start event")  # closed by the start timeout, nothing else


def upgrade_status(server: RunningServer, path: str, headers: dict[str, str]) -> int:
    """The HTTP status a WebSocket upgrade request to ``path`` gets (101 when the socket opens)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(raw.recv(1024).split(b" ", 2)[1])


def test_forged_stream_auth_token_is_refused_at_the_upgrade(bridge_server: RunningServer) -> None:
    assert upgrade_status(bridge_server, "/telnyx/media", {"x-telnyx-streaming-auth-token": "forged"}) == 403
    assert upgrade_status(bridge_server, "/telnyx/media", {}) == 101  # TeXML streams send no header


def test_forged_telnyx_start_for_a_failed_call_sends_nothing(bridge_server: RunningServer,
                                                             redis_url: str) -> None:
    call_id = "v3:" + uuid.uuid4().hex
    request_id = "forged-" + uuid.uuid4().hex[:12]
    client = redis_lib.Redis.from_url(redis_url)
    keys = RedisKeys("e2e")
    client.hset(keys.call("telnyx", call_id), mapping={"session_id": "sess_x"})
    client.hset(keys.leg("sess_x", "telnyx", call_id), mapping={"state": "ended",
                                                                 "end_reason": "relay_kallglot_unreachable"})
    ws = Client.connect(bridge_server.url.replace("http", "ws") + "/telnyx/media",
                        headers={"X-Request-ID": request_id})
    ws.send(json.dumps({"event": "start", "stream_id": "s1", "start": {"call_control_id": call_id}}))
    with pytest.raises(ConnectionClosed):
        for _ in range(20):
            ws.receive(timeout=0.5)
    assert ws.close_reason == 1008  # refused: the start carried no relay token
    # The socket's last line is written after the handler's goodbye step: once it is there, a goodbye attempt
    # (before the fix the bridge asked Telnyx to say goodbye on that call, and logged the attempt) would be too.
    assert wait_until(lambda: closed_media_sockets(bridge_server, request_id=request_id), timeout=10)
    lines = [r["message"] for r in log_records(bridge_server) if r.get("request_id") == request_id]
    assert any("media socket refused" in line for line in lines), lines
    assert not [line for line in lines if "goodbye" in line], lines


def test_unauthenticated_start_with_a_huge_id_logs_a_short_line(bridge_server: RunningServer) -> None:
    # Big, but within the socket's 256 KiB message limit (a bigger frame is refused with 1009, never parsed).
    marker = "X" * 100_000
    request_id = "huge-" + uuid.uuid4().hex[:12]
    ws = Client.connect(bridge_server.url.replace("http", "ws") + "/telnyx/media",
                        headers={"X-Request-ID": request_id})
    ws.send(json.dumps({"event": "start", "stream_id": marker, "start": {"call_control_id": marker}}))
    with pytest.raises(ConnectionClosed):
        for _ in range(20):
            ws.receive(timeout=0.5)
    assert ws.close_reason == 1008  # the start was parsed and refused (no relay token), not cut short as too big
    # Every line the socket's handler wrote is in the log once its last line is (see above).
    assert wait_until(lambda: closed_media_sockets(bridge_server, request_id=request_id), timeout=10)
    assert any("X" * 40 in r["message"] for r in log_records(bridge_server) if r.get("request_id") == request_id)
    assert max(len(line) for line in bridge_server.log().splitlines()) < 4096


def test_relay_token_replayed_on_a_second_socket_is_refused(bridge_server: RunningServer,
                                                           emulator: EmulatorControl) -> None:
    sim = TwilioCallSimulator(bridge_server.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    call_sid = "CA" + uuid.uuid4().hex
    answer = sim.post_voice_webhook(*new_numbers(), call_sid)
    stream_el = ET.fromstring(answer.text).find("Connect/Stream")
    params = {p.get("name"): p.get("value") for p in stream_el.findall("Parameter")}
    url = stream_el.get("url")
    streams = []
    for _ in range(2):
        ws = Client.connect(url, headers={"X-Twilio-Signature": sim.validator.compute_signature(url, {})})
        stream = SimulatedStream(ws, call_sid=call_sid, account_sid=TWILIO_ACCOUNT_SID, stream_sid="MZ" + uuid.uuid4().hex,
                                 log=lambda *args, **kwargs: None)
        stream.start()
        stream.send_event("connected", {"protocol": "Call", "version": "1.0.0"}, seq=False)
        stream.send_event("start", {"streamSid": stream.stream_sid, "start": {
            "accountSid": TWILIO_ACCOUNT_SID, "streamSid": stream.stream_sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        streams.append(stream)
        if len(streams) == 1:
            assert wait_until(lambda: emulator.session(params["session_id"])["connections_live"] == 1)
    first, second = streams
    try:
        assert second.wait_for(lambda s: s.server_closed, timeout=5) and second.close_code == 1008
        assert not first.server_closed
        assert emulator.session(params["session_id"])["connections_total"] == 1
    finally:
        for stream in streams:
            if not stream.server_closed:
                stream.hang_up()
            stream.finish()


@pytest.fixture
def nginx_in_front(bridge_server: RunningServer, tmp_path) -> Iterator[str]:
    """docs/deploy/nginx.conf (as shipped, upstream pointed at the test bridge) on a free loopback port."""
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (.ci/run installs nginx-light)")
    port = free_port()
    site = (REPO_ROOT / "docs/deploy/nginx.conf").read_text()
    site = site.replace("server app:5000;", f"server 127.0.0.1:{bridge_server.port};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\ndaemon off;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {tmp_path};\n proxy_temp_path {tmp_path};\n"
        f" include {tmp_path}/site.conf;\n}}\n")
    proc = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_nginx_config_proxies_media_and_refuses_big_bodies(nginx_in_front: str) -> None:
    assert requests.get(nginx_in_front + "/healthz", timeout=5).status_code == 200
    assert requests.post(nginx_in_front + "/kallglot/webhooks", data=b"x" * (2 * 1024 * 1024),
                         timeout=10).status_code == 413  # refused by the proxy, never read by the app
    ws = Client.connect(nginx_in_front.replace("http", "ws") + "/telnyx/media")  # the upgrade goes through
    assert closed_for_no_start(ws) == (1008, "no start event")  # the app's start timeout, through the proxy
