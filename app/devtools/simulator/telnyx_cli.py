"""``python -m app.devtools.simulator.telnyx_cli``: place one simulated Telnyx call against a running service.

- ``texml``: Telnyx fetches TeXML from ``/telnyx/texml`` (signed with the demo key) and streams the call.
- ``call-control``: Telnyx sends ``call.initiated`` to ``/telnyx/call-control`` and follows the service's
  commands (answer → media stream, speak, hangup). Against a running demo the call goes through the demo's
  fake Telnyx API (the service already sends its commands there); otherwise, or with ``--api-port``, this
  command runs a fake Telnyx REST API itself (point the service's ``TELNYX_API_URL`` at
  ``http://127.0.0.1:<port>/v2``).
- ``public-key``: print the demo public key to give the service as ``TELNYX_PUBLIC_KEY``.

Defaults come from the environment, then from a running demo's ``.demo/env``. Relay tokens are never printed.
"""
from __future__ import annotations

import argparse
import base64
import sys
import threading
import time
import warnings
from typing import Any

import requests
from werkzeug.serving import make_server

from app.devtools.simulator.audio import read_wav_as_ulaw, speech_like_tone, write_ulaw_as_wav
from app.devtools.simulator.number_apis import DEMO_CALL_CONTROL_APP_ID, DEMO_TEXML_APP_ID, demo_telnyx_seed
from app.devtools.simulator.telnyx import TelnyxSigner, TexmlCallSimulator, new_call_control_id
from app.devtools.simulator.telnyx_api import EXTENSION_KEY, FakeCall, FakeTelnyx, create_fake_call_control_app
from app.envfile import environment_with_demo

DEFAULT_API_PORT = 8075
FORBIDDEN_HINT = ("HINT: the service refused Telnyx's signature (403). Most likely its TELNYX_PUBLIC_KEY is not "
                  "the demo key this simulator signs with: start it with TELNYX_PUBLIC_KEY=$(.venv/bin/python -m "
                  "app.devtools.simulator.telnyx_cli public-key) (the demo sets it). A service without "
                  "TELNYX_PUBLIC_KEY refuses every Telnyx request.")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def caller_audio(mulaw: bytes, codec: str) -> tuple[bytes, int]:
    """The caller's audio in the leg's codec: PCMU and PCMA at 8 kHz, L16 big-endian at 16 kHz."""
    if codec == "PCMU":
        return mulaw, 8000
    pcm = audioop.ulaw2lin(mulaw, 2)
    if codec == "PCMA":
        return audioop.lin2alaw(pcm, 2), 8000
    wide, _ = audioop.ratecv(pcm, 2, 1, 8000, 16000, None)
    return (audioop.byteswap(wide, 2) if sys.byteorder == "little" else wide), 16000


def demo_number(flow: str) -> str:
    """The demo's number on the flow's Telnyx application (+15005550106 on TeXML, +15005550107 on Call Control):
    a call's default ``--to``, so switching that number (README "Transports") changes what the call does."""
    app_id = DEMO_TEXML_APP_ID if flow == "texml" else DEMO_CALL_CONTROL_APP_ID
    return next(str(n["phone_number"]) for n in demo_telnyx_seed("")["phone_numbers"] if n["connection_id"] == app_id)


def _report(commands: list[dict[str, Any]], webhooks: list[dict[str, Any]]) -> bool:
    """Print the commands and webhooks (names and statuses only: bodies hold relay tokens); True on a 403."""
    for command in commands:
        print(f"command {command['action']}")
    for hook in webhooks:
        print(f"webhook {hook['event']} -> {hook['status']}")
    return any(hook["status"] == 403 for hook in webhooks)


def run_call_control_on_demo(args: argparse.Namespace, fake_url: str, payload: bytes,
                             rate: int) -> tuple[bytes, list[str], list[str], bool]:
    """Place one call through the running demo's fake Telnyx (its control API) and wait until it hangs up."""
    scenario = {"to": args.to, "from": args.from_, "encoding": args.codec, "sample_rate": rate,
                "payload": base64.b64encode(payload).decode(), "listen_seconds": args.listen}
    call_id = requests.post(f"{fake_url}/_fake/calls", json=scenario, timeout=args.timeout).json()["call_control_id"]
    print(f"the demo's fake Telnyx API at {fake_url}/v2; call {call_id}")
    deadline = time.monotonic() + args.timeout + len(payload) / rate + args.listen
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = requests.get(f"{fake_url}/_fake/calls/{call_id}", timeout=args.timeout).json()
        if view["hung_up"]:
            time.sleep(0.5)  # the last webhooks
            view = requests.get(f"{fake_url}/_fake/calls/{call_id}", timeout=args.timeout).json()
            break
        time.sleep(0.2)
    forbidden = _report(view.get("commands", []), view.get("webhooks", []))
    return base64.b64decode(view.get("heard", "")), view.get("spoken", []), view.get("protocol_errors", []), forbidden


def run_call_control(args: argparse.Namespace, payload: bytes, rate: int) -> tuple[bytes, list[str], list[str], bool]:
    """Serve the fake Telnyx API, place one call through it and wait until it hangs up."""
    app = create_fake_call_control_app({"FAKE_TELNYX_WEBHOOK_URL": args.base_url.rstrip("/") + "/telnyx/call-control"})
    fake: FakeTelnyx = app.extensions[EXTENSION_KEY]
    server = make_server("127.0.0.1", args.api_port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    call = FakeCall(call_control_id=new_call_control_id(), to=args.to, from_=args.from_, scenario={
        "encoding": args.codec, "sample_rate": rate, "payload": base64.b64encode(payload).decode(),
        "listen_seconds": args.listen})
    fake.calls[call.call_control_id] = call
    print(f"fake Telnyx API on http://127.0.0.1:{args.api_port}/v2; call {call.call_control_id}")
    try:
        fake.place(call)
        deadline = time.monotonic() + args.timeout + len(payload) / rate + args.listen
        while not call.hung_up and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the last webhooks
    finally:
        server.shutdown()
    forbidden = _report(call.commands, call.webhooks)
    return bytes(call.heard), call.spoken, call.protocol_errors, forbidden


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exit status 0 when the call was bridged and audio came back, else 1."""
    env = environment_with_demo()
    p = argparse.ArgumentParser(prog="python -m app.devtools.simulator.telnyx_cli", description=__doc__.splitlines()[0])
    p.add_argument("flow", choices=("texml", "call-control", "public-key"))
    p.add_argument("--base-url", default=env.get("DEMO_BASE_URL") or "http://127.0.0.1:5000",
                   help="where the service listens (default: the running demo's, else port 5000)")
    p.add_argument("--public-url", default=env.get("PUBLIC_URL") if env.get("DEMO_BASE_URL") else None,
                   help="the service's PUBLIC_URL (default: --base-url)")
    p.add_argument("--api-port", type=int, default=None,
                   help=f"call-control: run a fake Telnyx API on this port (default: use the running demo's, "
                        f"else {DEFAULT_API_PORT})")
    p.add_argument("--codec", choices=("PCMU", "PCMA", "L16"), default="PCMU", help="the caller leg's codec")
    p.add_argument("--to", default=None, help="the number called (default: the demo's number on the flow's "
                                              "application, texml +15005550106, call-control +15005550107)")
    p.add_argument("--from", dest="from_", default="+15551230000")
    p.add_argument("--wav", default=None, help="caller audio (default: 3 s of a speech-like tone)")
    p.add_argument("--out", default="heard.wav", help="write what the caller heard here as WAV")
    p.add_argument("--listen", type=float, default=3.0, help="seconds to keep listening after the audio")
    p.add_argument("--timeout", type=float, default=10.0, help="per network operation, seconds")
    args = p.parse_args(argv)
    signer = TelnyxSigner()  # the demo key
    if args.flow == "public-key":
        print(signer.public_key)
        return 0
    args.to = args.to or demo_number(args.flow)
    payload, rate = caller_audio(read_wav_as_ulaw(args.wav) if args.wav else speech_like_tone(3.0), args.codec)
    if args.flow == "texml":
        sim = TexmlCallSimulator(args.base_url, signer, public_url=args.public_url, timeout=args.timeout)
        result = sim.place_call(args.to, args.from_, payload, encoding=args.codec, sample_rate=rate, pace=True,
                                listen_seconds=args.listen)
        heard = result.heard  # every stream of the call (a restored stream adds one)
        spoken, errors = result.said, result.errors + (result.leg.protocol_errors if result.leg else [])
        forbidden = result.webhook_status == 403 or any(status == 403 for _, status in result.callbacks)
        print(f"call {result.call_sid}  TeXML HTTP {result.webhook_status}  callbacks {result.callbacks}")
    elif args.api_port is None and env.get("DEMO_FAKE_TELNYX_URL"):
        heard, spoken, errors, forbidden = run_call_control_on_demo(args, env["DEMO_FAKE_TELNYX_URL"], payload, rate)
    else:
        args.api_port = args.api_port or DEFAULT_API_PORT
        heard, spoken, errors, forbidden = run_call_control(args, payload, rate)
    if heard:
        write_ulaw_as_wav(args.out, heard)
    print(f"sent {len(payload)} bytes of {args.codec}, heard {len(heard) / 8000:.2f} s"
          + (f" -> {args.out}" if heard else "") + (f"; said: {spoken}" if spoken else ""))
    for problem in errors:
        print(f"ERROR {problem}", file=sys.stderr)
    if forbidden:
        print(FORBIDDEN_HINT, file=sys.stderr)
    return 0 if heard and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
