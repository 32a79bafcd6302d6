"""The demo's banner: every URL a newcomer needs and the exact commands to place each kind of call."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

RULE = "=" * 78


def banner(settings: Mapping[str, str], notes: list[str], problems: list[str], env_file: Path) -> str:
    """The text printed once the bridge answers (``settings``: what ``.demo/env`` holds)."""
    base = settings["DEMO_BASE_URL"]
    public = settings["PUBLIC_URL"].rstrip("/")
    lines = [RULE, "kallglot-bridge DEMO: published demo secrets, listening on 127.0.0.1 only. Not for real calls."]
    lines += [f"  * {note}" for note in notes]
    lines += ["", "Open:",
              f"  Landing page        {base}/",
              f"  Admin               {base}/admin/   password: {settings['ADMIN_PASSWORD']}",
              f"  Metrics             {base}/metrics",
              f"  Readiness           {base}/readyz" + ("" if not problems else "   NOT READY: " + "; ".join(problems)),
              "", "Carrier webhooks (what a real number would point at):",
              f"  Twilio              {public}/twilio/voice   {public}/twilio/status   {public}/twilio/fallback",
              f"  Telnyx TeXML        {public}/telnyx/texml   {public}/telnyx/texml/status",
              f"  Telnyx Call Control {public}/telnyx/call-control",
              f"  Kallglot webhooks   {public}/kallglot/webhooks"]
    fakes = [(label, settings[name]) for label, name in (("Fake Twilio API", "DEMO_FAKE_TWILIO_URL"),
                                                         ("Fake Telnyx API", "DEMO_FAKE_TELNYX_URL"),
                                                         ("Kallglot (emulator)", "KALLGLOT_API_URL"))
             if settings.get(name)]
    if fakes:
        lines += ["", "Local stand-ins:"] + [f"  {label:<19} {url}" for label, url in fakes]
    lines += ["", f"Settings for the CLI and the simulators: {env_file} (removed when the demo stops)",
              "", "In a second terminal, from this directory:",
              "  Twilio call         .venv/bin/kallglot-simulate-call",
              "  Telnyx TeXML call   .venv/bin/python -m app.devtools.simulator.telnyx_cli texml",
              "  Telnyx Call Control .venv/bin/python -m app.devtools.simulator.telnyx_cli call-control",
              "  Number profiles     .venv/bin/flask --app 'app:create_app()' numbers list",
              "  Outbound call       set -a; . .demo/env; set +a",
              '                      curl -sS -X POST "$PUBLIC_URL/api/calls" -H "Authorization: Bearer $API_TOKEN" '
              "-H 'Content-Type: application/json' "
              """-d '{"to": "+14155550100", "from": "+15005550006", "carrier": "twilio"}'""",
              "", "Logs: the bridge's below (JSON, one object per line); the stand-ins' in "
              f"{env_file.parent}/*.log. Stop with Ctrl-C.", RULE]
    return "\n".join(lines)
