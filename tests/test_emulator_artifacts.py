"""The emulator's after-call side: transcript and recordings REST, MP3 audio, signed after-call webhooks."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app.devtools.emulator import create_emulator_app
from app.devtools.emulator.artifacts import encode_mp3
from app.kallglot.signature import verify

API_KEY, SECRET = "sk_test_artifacts", "whsec_emulator_test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Receiver(ThreadingHTTPServer):
    """A loopback HTTP server that keeps every POST (headers and raw body)."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.got = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.got:
                    outer.posts.append((dict(self.headers), body))
                    outer.got.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.timeout = 5


def test_transcript_recordings_and_signed_webhooks_after_end() -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        app = create_emulator_app({"KALLGLOT_EMULATOR_API_KEY": API_KEY,
                                   "KALLGLOT_EMULATOR_WEBHOOK_URL": f"http://127.0.0.1:{receiver.server_port}/hook",
                                   "KALLGLOT_EMULATOR_WEBHOOK_SECRET": SECRET})
        client = app.test_client()
        session = client.post("/v1/sessions", json={"mode": "bidirectional_translation"}, headers=AUTH).get_json()
        sid = session["id"]
        assert client.post(f"/_emulator/sessions/{sid}/send", json={"messages": [
            {"type": "transcript.final", "speaker": "agent", "language": "en", "text": "Hello",
             "translation": {"language": "de", "text": "Hallo"}}]}).status_code == 200
        assert client.get(f"/v1/sessions/{sid}/transcript").status_code == 401  # the API key is required
        running = client.get(f"/v1/sessions/{sid}/transcript", headers=AUTH).get_json()
        assert running["status"] == "in_progress" and running["turns"][0]["translation"] == {"language": "de",
                                                                                            "text": "Hallo"}
        assert client.get(f"/v1/sessions/{sid}/recordings", headers=AUTH).get_json() == {"object": "list", "data": []}
        assert client.post(f"/v1/sessions/{sid}/end", headers=AUTH).status_code == 200
        assert client.post(f"/v1/sessions/{sid}/end", headers=AUTH).status_code == 200  # webhooks go once
        with receiver.got:
            assert receiver.got.wait_for(lambda: len(receiver.posts) >= 3, timeout=10)
        events = []
        for headers, body in receiver.posts:
            assert verify(SECRET, headers["Kallglot-Signature"], body)
            events.append(json.loads(body))
        assert [e["type"] for e in events] == ["session.ended", "transcript.ready", "recording.ready"]
        assert events[0]["data"]["id"] == sid and isinstance(events[0]["data"]["duration"], float)
        assert len({e["id"] for e in events}) == 3
        done = client.get(f"/v1/sessions/{sid}/transcript", headers=AUTH).get_json()
        assert done["status"] == "completed" and done["metadata"]["total_turns"] == 1
        assert client.get("/v1/recordings/rec_nothing/audio", headers=AUTH).status_code == 404
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert len(receiver.posts) == 3


def test_recordings_are_mp3() -> None:
    mp3 = encode_mp3(b"\x00\x10" * 8000)  # one second of 16-bit PCM at 8 kHz
    assert mp3[:2] in (b"\xff\xe3", b"\xff\xf3", b"\xff\xe2", b"\xff\xf2") or mp3[:3] == b"ID3"
    assert 2000 < len(mp3) < 8000  # about 32 kbit/s
