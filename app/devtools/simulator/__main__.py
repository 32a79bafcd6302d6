"""``python -m app.devtools.simulator``: place one simulated Twilio call against a running service.

Defaults come from the environment, then from a running demo's ``.demo/env``: ``kallglot-simulate-call``
with no options calls the demo.
"""
from __future__ import annotations

import argparse
import sys

from app.devtools.simulator.audio import SAMPLE_RATE, read_wav_as_ulaw, speech_like_tone, write_ulaw_as_wav
from app.devtools.simulator.twilio import TwilioCallSimulator
from app.envfile import environment_with_demo

DEMO_AUTH_TOKEN = "demo-twilio-auth-token"
FORBIDDEN_HINT = ("HINT: the service refused the webhook's signature (403). Most likely its TWILIO_AUTH_TOKEN is "
                  "not the one this simulator signs with (--auth-token), or its PUBLIC_URL is not --public-url "
                  "(Twilio signs the public URL). A service without TWILIO_AUTH_TOKEN refuses every Twilio request.")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exit status 0 when a stream (or, for a ``sip`` number, a SIP dial) was established and audio
    came back, else 1."""
    env = environment_with_demo()
    p = argparse.ArgumentParser(prog="kallglot-simulate-call", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=env.get("DEMO_BASE_URL") or "http://127.0.0.1:5000",
                   help="where the service really listens (default: the running demo's, else port 5000)")
    p.add_argument("--public-url", default=env.get("PUBLIC_URL") if env.get("DEMO_BASE_URL") else None,
                   help="the service's PUBLIC_URL, which Twilio signs (default: --base-url)")
    p.add_argument("--auth-token", default=env.get("TWILIO_AUTH_TOKEN") or DEMO_AUTH_TOKEN,
                   help="the service's TWILIO_AUTH_TOKEN (default: $TWILIO_AUTH_TOKEN, the demo's, or the demo value)")
    p.add_argument("--account-sid", default=env.get("TWILIO_ACCOUNT_SID") or None)
    p.add_argument("--to", default="+15005550006")
    p.add_argument("--from", dest="from_", default="+15551230000")
    p.add_argument("--wav", default=None, help="caller audio (default: 3 s of a speech-like tone)")
    p.add_argument("--out", default="heard.wav", help="write what the caller heard here as WAV")
    p.add_argument("--no-pace", action="store_true", help="send audio as fast as possible")
    p.add_argument("--listen", type=float, default=3.0, help="seconds to keep listening after the audio")
    p.add_argument("--timeout", type=float, default=10.0, help="per network operation, seconds")
    args = p.parse_args(argv)

    audio = read_wav_as_ulaw(args.wav) if args.wav else speech_like_tone(3.0)
    sim = TwilioCallSimulator(args.base_url, args.auth_token, public_url=args.public_url,
                              account_sid=args.account_sid, timeout=args.timeout)
    result = sim.place_call(args.to, args.from_, audio, pace=not args.no_pace, listen_seconds=args.listen)
    result.print_timeline()
    if result.heard_audio:
        write_ulaw_as_wav(args.out, result.heard_audio)
    print("--- summary ---")
    print(f"call {result.call_sid}  stream {result.stream_sid or '-'}  webhook HTTP {result.webhook_status}")
    print(f"sent {len(result.sent_audio)} bytes ({len(result.sent_audio) / SAMPLE_RATE:.2f} s), "
          f"heard {len(result.heard_audio)} bytes ({len(result.heard_audio) / SAMPLE_RATE:.2f} s)"
          + (f" -> {args.out}" if result.heard_audio else ""))
    print(f"marks received {result.marks_received}, echoed {result.marks_echoed}; clears {result.clears}")
    print(f"said: {result.said}  hung up: {result.hung_up}  server closed first: {result.server_closed_first}")
    print(f"callbacks: {result.callbacks}")
    for dial in result.sip_dials:
        print(f"SIP dial {dial.uri} -> {dial.sip_status} {dial.reason}")
    for problem in result.errors + result.protocol_errors:
        print(f"ERROR {problem}", file=sys.stderr)
    if result.webhook_status == 403:
        print(FORBIDDEN_HINT, file=sys.stderr)
    connected = result.stream_sid or any(dial.answered for dial in result.sip_dials)
    return 0 if connected and result.heard_audio else 1


if __name__ == "__main__":
    sys.exit(main())
