"""Sealed relay tokens: unforgeable, short-lived, bound to one call, and opaque."""
from __future__ import annotations

import pytest

from app.relay.tokens import InvalidRelayToken, RelayGrant, RelayTokenSealer

GRANT = RelayGrant(session_id="sess_1", carrier="twilio", call_id="CA" + "a" * 32, speaker="customer",
                   stream_url="wss://api.kallglot.com/v1/sessions/sess_1/connect",
                   stream_token="kst_live_SECRET", stream_expires_at=1_900_000_000.0)


def test_round_trip() -> None:
    sealer = RelayTokenSealer("k" * 32)
    token = sealer.seal(GRANT, now=1000)
    assert sealer.open(token, carrier="twilio", call_id=GRANT.call_id, now=1001) == GRANT


def test_token_hides_the_kallglot_stream_token() -> None:
    token = RelayTokenSealer("k" * 32).seal(GRANT)
    assert "kst_live" not in token and "SECRET" not in token and "sess_1" not in token
    assert "SECRET" not in repr(GRANT)


@pytest.mark.parametrize("case", ["other-key", "tampered", "expired", "other-call", "other-carrier", "missing",
                                  "garbage"])
def test_refused(case: str) -> None:
    sealer = RelayTokenSealer("k" * 32)
    token = sealer.seal(GRANT, now=1000)
    carrier, call_id, now = "twilio", GRANT.call_id, 1001.0
    if case == "other-key":
        sealer = RelayTokenSealer("z" * 32)
    elif case == "tampered":
        token = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    elif case == "expired":
        now = 1000 + sealer.ttl_seconds + 1
    elif case == "other-call":
        call_id = "CA" + "b" * 32
    elif case == "other-carrier":
        carrier = "telnyx"
    elif case == "missing":
        token = ""
    else:
        token = "not a token!"
    with pytest.raises(InvalidRelayToken):
        sealer.open(token, carrier=carrier, call_id=call_id, now=now)
