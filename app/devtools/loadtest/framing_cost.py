"""``python -m app.devtools.loadtest.framing_cost``: CPU per carrier frame of each WebSocket layer's framing alone.

A load-independent companion to the load benchmark (CPU time, not wall time, so other processes on the machine
change it little): 20 000 masked Twilio ``media`` frames, fed 10 at a time as one ``recv`` would bring them on a
busy socket, through

- wsproto as simple-websocket drives it (``receive_data`` + its event loop, one message at a time), and
- websockets' sans-I/O ``ServerProtocol`` (C-accelerated unmasking) with this project's message assembly,

plus building one outbound ``media`` frame each way (wsproto's ``send`` vs the pre-built header of
:class:`app.websocket.SansIoServer`). Greenlet switches and socket calls are not in these figures: the load
benchmark's profile shows those.
"""
from __future__ import annotations

import base64
import json
import os
import time

from websockets.frames import Opcode
from websockets.server import ServerProtocol
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage

FRAMES, PER_READ = 20_000, 10
HANDSHAKE = (b"GET /twilio/media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def masked_text_frame(payload: bytes) -> bytes:
    """One client → server text frame (masked, as a client must)."""
    key = os.urandom(4)
    head = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") if len(payload) >= 126 else \
        bytes([0x81, 0x80 | len(payload)])
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def twilio_media(n: int) -> bytes:
    """A Twilio media frame as the load generator sends it."""
    return json.dumps({"event": "media", "sequenceNumber": str(n), "media": {
        "track": "inbound", "chunk": str(n), "timestamp": str(n * 20),
        "payload": base64.b64encode(os.urandom(160)).decode()}, "streamSid": "MZ" + "0" * 32}).encode()


def wsproto_cost(reads: list[bytes]) -> tuple[float, float]:
    """(µs per inbound frame, µs per outbound frame) with wsproto."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(HANDSHAKE)
    for event in ws.events():
        if isinstance(event, Request):
            from wsproto.events import AcceptConnection
            ws.send(AcceptConnection())
    received = 0
    started = time.process_time()
    for data in reads:
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage) and event.message_finished:
                received += 1
    inbound = (time.process_time() - started) / received * 1e6
    out = '{"event":"media","streamSid":"MZ0","media":{"payload":"' + "A" * 1068 + '"}}'
    started = time.process_time()
    for _ in range(FRAMES // 5):
        ws.send(TextMessage(data=out))
    return inbound, (time.process_time() - started) / (FRAMES // 5) * 1e6


def sansio_cost(reads: list[bytes]) -> tuple[float, float]:
    """(µs per inbound frame, µs per outbound frame) with websockets' sans-I/O protocol, as app/websocket.py."""
    protocol = ServerProtocol(max_size=256 * 1024)
    protocol.receive_data(HANDSHAKE)
    protocol.send_response(protocol.accept(protocol.events_received()[0]))
    protocol.data_to_send()
    received = 0
    started = time.process_time()
    for data in reads:
        protocol.receive_data(data)
        for frame in protocol.events_received():
            if frame.opcode is Opcode.TEXT and frame.fin:
                bytes(frame.data).decode()
                received += 1
        protocol.data_to_send()
    inbound = (time.process_time() - started) / received * 1e6
    out = '{"event":"media","streamSid":"MZ0","media":{"payload":"' + "A" * 1068 + '"}}'
    started = time.process_time()
    for _ in range(FRAMES // 5):
        payload = out.encode()
        b"\x81\x7e" + len(payload).to_bytes(2, "big") + payload
    return inbound, (time.process_time() - started) / (FRAMES // 5) * 1e6


def main() -> None:
    """Build the frames, run both, print µs per frame."""
    frames = [masked_text_frame(twilio_media(n)) for n in range(FRAMES)]
    reads = [b"".join(frames[i:i + PER_READ]) for i in range(0, FRAMES, PER_READ)]
    print(f"{FRAMES} Twilio media frames ({len(frames[0])} B each on the wire), {PER_READ} per read; CPU µs per frame")
    for name, cost in (("simple-websocket's wsproto", wsproto_cost), ("websockets sans-I/O (WEBSOCKET_LAYER=sansio)",
                                                                      sansio_cost)):
        inbound, outbound = cost(reads)
        print(f"  {name:46} inbound {inbound:6.1f}   outbound (one echo frame) {outbound:6.1f}")


if __name__ == "__main__":
    main()
