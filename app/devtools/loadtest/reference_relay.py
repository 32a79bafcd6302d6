"""The load benchmark's reference: a Twilio ⇄ Kallglot relay in the style of Twilio's own Python sample
(FastAPI + uvicorn, the ``websockets`` library, one asyncio task per direction), doing the bridge's media work:

- ``POST /twilio/voice``: check ``X-Twilio-Signature`` (the twilio library), create a Kallglot session (REST),
  answer ``<Connect><Stream>`` with the stream's URL and token as ``<Parameter>``s;
- ``/twilio/media`` (WebSocket): check the upgrade's signature, wait for ``start``, open the Kallglot stream;
  uplink: parse each ``media`` frame, batch ``UPLINK_CHUNK_MS`` of μ-law, re-wrap it as ``audio.input``;
  downlink: each ``audio.output`` becomes one Twilio ``media`` frame; ``stop`` or either side closing ends both.

Dev-only (``pip install -e '.[loadtest]'``); ``python -m app.devtools.loadtest --reference`` runs it beside
the bridge with the same generator, on the same core, in the same run. Not for production: no lifecycle,
no Redis, no reconnects, and the Kallglot stream token travels in the TwiML (the bridge seals it).
Settings from the environment: ``KALLGLOT_API_URL``, ``KALLGLOT_API_KEY``, ``PUBLIC_URL``,
``TWILIO_AUTH_TOKEN``, ``UPLINK_CHUNK_MS``.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from urllib.parse import parse_qsl, quote
from xml.sax.saxutils import quoteattr

import httpx
import websockets
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator

KALLGLOT_API_URL = os.environ.get("KALLGLOT_API_URL", "http://127.0.0.1:8090/v1")
KALLGLOT_API_KEY = os.environ.get("KALLGLOT_API_KEY", "")
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
CHUNK_BYTES = int(os.environ.get("UPLINK_CHUNK_MS", "100")) * 8

app = FastAPI()
validator = RequestValidator(os.environ.get("TWILIO_AUTH_TOKEN", ""))
kallglot = httpx.AsyncClient(timeout=10)


@app.get("/healthz")
async def healthz() -> Response:
    """Ready."""
    return Response("ok")


@app.get("/metrics")
async def metrics() -> Response:
    """No relay histograms here (the benchmark prints '-' for them)."""
    return Response("", media_type="text/plain")


@app.post("/twilio/voice")
async def voice(request: Request) -> Response:
    """Signed webhook → Kallglot session → ``<Connect><Stream>``."""
    params = dict(parse_qsl((await request.body()).decode()))
    if not validator.validate(PUBLIC_URL + "/twilio/voice", params, request.headers.get("X-Twilio-Signature", "")):
        return Response(status_code=403)
    created = await kallglot.post(KALLGLOT_API_URL + "/sessions", json={"mode": "bidirectional_translation"},
                                  headers={"Authorization": f"Bearer {KALLGLOT_API_KEY}",
                                           "Idempotency-Key": params.get("CallSid", str(uuid.uuid4()))})
    if created.status_code >= 300:
        return Response(status_code=502)
    stream = created.json()["stream"]
    media_url = PUBLIC_URL.replace("http", "ws", 1) + "/twilio/media"
    twiml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url={quoteattr(media_url)}>'
             f'<Parameter name="kallglot_url" value={quoteattr(stream["url"])}/>'
             f'<Parameter name="kallglot_token" value={quoteattr(stream["token"])}/>'
             f'</Stream></Connect></Response>')
    return Response(twiml, media_type="text/xml")


@app.websocket("/twilio/media")
async def media(ws: WebSocket) -> None:
    """One call's media socket, relayed to its Kallglot stream until either side ends."""
    if not validator.validate(PUBLIC_URL.replace("http", "ws", 1) + "/twilio/media", {},
                              ws.headers.get("X-Twilio-Signature", "")):
        await ws.close(1008)
        return
    await ws.accept()
    start: dict = {}
    while not start:
        message = json.loads(await ws.receive_text())
        if message.get("event") == "start":
            start = message
        elif message.get("event") == "stop":
            await ws.close()
            return
    stream_sid = start["streamSid"]
    custom = start["start"].get("customParameters", {})
    url = custom["kallglot_url"] + "?token=" + quote(custom["kallglot_token"])
    async with websockets.connect(url, compression=None, max_size=2**20) as upstream:

        async def uplink() -> None:
            pending, sequence = bytearray(), 0
            try:
                while True:
                    message = json.loads(await ws.receive_text())
                    event = message.get("event")
                    if event == "media":
                        pending += base64.b64decode(message["media"]["payload"])
                        if len(pending) >= CHUNK_BYTES:
                            sequence += 1
                            await upstream.send(json.dumps({
                                "type": "audio.input", "sequence": sequence, "timestamp_ms": int(time.time() * 1000),
                                "speaker": "customer",
                                "audio": {"encoding": "mulaw", "sample_rate_hz": 8000,
                                          "payload": base64.b64encode(bytes(pending[:CHUNK_BYTES])).decode()}}))
                            del pending[:CHUNK_BYTES]
                    elif event == "stop":
                        return
            except WebSocketDisconnect:
                return

        async def downlink() -> None:
            try:
                async for raw in upstream:
                    message = json.loads(raw)
                    if message.get("type") == "audio.output":
                        payload = base64.b64decode(message["audio"]["payload"])
                        await ws.send_text(json.dumps({"event": "media", "streamSid": stream_sid,
                                                       "media": {"payload": base64.b64encode(payload).decode()}}))
            except websockets.ConnectionClosed:
                return

        tasks = [asyncio.create_task(uplink()), asyncio.create_task(downlink())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
    try:
        await ws.close()
    except RuntimeError:  # already closed by the carrier
        pass
