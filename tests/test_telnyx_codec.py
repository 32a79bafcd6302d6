"""The Telnyx media codec and the uplink decoders (PCMA, L16 16 kHz → μ-law 8 kHz), measured on speech-like audio."""
from __future__ import annotations

import base64
import json
import math
import warnings

import pytest

from app.relay.audio import UnsupportedAudio, UplinkDecoder
from app.carriers.contract import Connected, Dtmf, Ignored, Malformed, MarkPlayed, Media, Stopped, StreamStarted
from app.carriers.telnyx.codec import FRAME_SEPARATOR, MAX_OUTBOUND_BYTES, TelnyxMediaCodec
from tests.support.signals import pcm, samples, snr_db, voiced

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def frame(event: str, **body: object) -> str:
    return json.dumps({"event": event, "sequence_number": "1", "stream_id": "s-1", **body})


def start(encoding: str = "PCMU", rate: int = 8000, params: dict[str, str] | None = None) -> str:
    return frame("start", start={"call_control_id": "v3:abcdefgh", "custom_parameters": params or {},
                                 "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1}})


def media(payload: bytes, chunk: int | None = None, track: str = "inbound") -> str:
    body: dict[str, object] = {"track": track, "payload": base64.b64encode(payload).decode()}
    if chunk is not None:
        body["chunk"] = str(chunk)
    return frame("media", media=body)


def decode_all(encoding: str, rate: int, payload: bytes, frame_bytes: int) -> bytes:
    decoder = UplinkDecoder.for_format(encoding, rate)
    return b"".join(decoder.to_mulaw_8k(payload[i:i + frame_bytes]) for i in range(0, len(payload), frame_bytes))


def test_pcma_leg_decodes_to_the_same_speech() -> None:
    speech = pcm(voiced(8000, 2.0))
    alaw = audioop.lin2alaw(speech, 2)
    mulaw = decode_all("PCMA", 8000, alaw, 160)
    reference = samples(audioop.alaw2lin(alaw, 2))  # the reference A-law decoder
    assert snr_db(reference, samples(audioop.ulaw2lin(mulaw, 2))) > 30
    # The bug this prevents: PCMA passed through as μ-law is noise, not speech.
    assert snr_db(reference, samples(audioop.ulaw2lin(alaw, 2))) < 0


def test_l16_16k_is_low_passed_and_decimated_to_8k() -> None:
    wide = voiced(16000, 2.0)
    mulaw = decode_all("L16", 16000, pcm(wide, ">"), 640)
    assert len(mulaw) == 16000
    reference = voiced(8000, 2.0)
    # The 65-tap filter delays by 16 output samples; aligned, the speech is intact (μ-law limits SNR to ~38 dB).
    assert snr_db(reference, samples(audioop.ulaw2lin(mulaw, 2)), lag=16) > 30


def test_l16_content_above_4khz_does_not_alias_into_the_speech_band() -> None:
    tone = [10000 * math.sin(2 * math.pi * 6000 * n / 16000) for n in range(16000)]
    mulaw = decode_all("L16", 16000, pcm(tone, ">"), 640)
    assert audioop.rms(audioop.ulaw2lin(mulaw, 2)[800:], 2) < 100  # ≥ 37 dB down (ratecv alone: ~ -9 dB)


def test_l16_frames_split_at_odd_bytes_decode_like_whole() -> None:
    payload = pcm(voiced(16000, 0.3), ">")
    assert decode_all("L16", 16000, payload, 333) == decode_all("L16", 16000, payload, 640)


@pytest.mark.parametrize("encoding, rate", [("G722", 16000), ("OPUS", 16000), ("PCMU", 16000), ("L16", 24000)])
def test_unsupported_inbound_codecs_are_refused(encoding: str, rate: int) -> None:
    with pytest.raises(UnsupportedAudio):
        UplinkDecoder.for_format(encoding, rate)
    event = TelnyxMediaCodec().parse(start(encoding, rate, {"relay_token": "t"}))
    assert isinstance(event, Malformed) and event.close_code == 1003


def test_start_carries_call_control_id_and_relay_token() -> None:
    codec = TelnyxMediaCodec()
    assert isinstance(codec.parse(frame("connected", version="1.0.0")), Connected)
    event = codec.parse(start(params={"relay_token": "tok", "session_id": "sess"}))
    assert event == StreamStarted(call_id="v3:abcdefgh", stream_id="s-1",
                                  parameters={"relay_token": "tok", "session_id": "sess"})


@pytest.mark.parametrize("source", ["header", "connected"])
def test_stream_auth_token_stands_in_for_the_relay_token(source: str) -> None:
    codec = TelnyxMediaCodec(auth_token="tok" if source == "header" else None)
    codec.parse(frame("connected", version="1.0.0", **{"x-telnyx-streaming-auth-token": "tok"}))
    event = codec.parse(start())
    assert isinstance(event, StreamStarted) and event.parameters == {"relay_token": "tok"}


def test_frames_are_reordered_by_chunk_and_late_ones_dropped() -> None:
    codec = TelnyxMediaCodec()
    codec.parse(start())
    out = [codec.parse(media(bytes([n]) * 160, chunk=n)) for n in (2, 1, 4, 3, 3, 5)]
    assert isinstance(out[0], Ignored)  # 2 waits for 1
    assert out[1] == Media(b"\x01" * 160 + b"\x02" * 160)
    assert isinstance(out[2], Ignored) and out[3] == Media(b"\x03" * 160 + b"\x04" * 160)
    assert isinstance(out[4], Malformed) and not out[4].fatal  # a duplicate of a frame already passed on
    assert out[5] == Media(b"\x05" * 160)


def test_a_lost_frame_is_given_up_after_the_window() -> None:
    codec = TelnyxMediaCodec()
    codec.parse(start())
    codec.parse(media(b"\x01" * 160, chunk=1))
    held = [codec.parse(media(bytes([n]) * 160, chunk=n)) for n in range(3, 8)]  # 2 never comes
    assert all(isinstance(e, Ignored) for e in held)
    assert codec.parse(media(b"\x08" * 160, chunk=8)) == Media(b"".join(bytes([n]) * 160 for n in range(3, 9)))


@pytest.mark.parametrize("raw, code", [
    (b"\x00binary", 1003), ("{nope", 1007), ("[1]", 1007), (media(b"\xff" * 160), 1008),
    (frame("start", start={"media_format": {}}), 1008),
])
def test_bad_frames_are_fatal_with_clear_codes(raw: str | bytes, code: int) -> None:
    event = TelnyxMediaCodec().parse(raw)
    assert isinstance(event, Malformed) and event.fatal and event.close_code == code


def test_other_events() -> None:
    codec = TelnyxMediaCodec()
    codec.parse(start())
    assert codec.parse(frame("dtmf", dtmf={"digit": "7"})) == Dtmf("7")
    assert codec.parse(frame("mark", mark={"name": "utt-1"})) == MarkPlayed("utt-1")
    assert isinstance(codec.parse(frame("stop", stop={})), Stopped)
    assert isinstance(codec.parse(media(b"\xff" * 160, track="outbound")), Ignored)
    assert isinstance(codec.parse(frame("error", payload={"code": 100003, "title": "malformed"})), Ignored)
    bad = codec.parse(frame("media", media={"payload": "***"}))
    assert isinstance(bad, Malformed) and not bad.fatal


def sent_messages(frames: str) -> list[dict[str, object]]:
    """The Telnyx messages one codec call produced (as FramedSocket sends them)."""
    return [json.loads(m) for m in frames.split(FRAME_SEPARATOR) if m]


def played(messages: list[dict[str, object]]) -> list[bytes]:
    return [base64.b64decode(m["media"]["payload"]) for m in messages if m["event"] == "media"]  # type: ignore[index]


def test_return_audio_goes_out_in_whole_20ms_frames_and_carries_the_rest() -> None:
    codec = TelnyxMediaCodec()
    assert codec.media(b"\x01" * 80) == ""  # under 20 ms: nothing yet, and never padded mid-speech
    assert played(sent_messages(codec.media(b"\x02" * 159))) == [b"\x01" * 80 + b"\x02" * 80]
    assert played(sent_messages(codec.media(b"\x03" * 161))) == [b"\x02" * 79 + b"\x03" * 81]
    # The utterance ends: the 80-byte remainder is padded to 20 ms and sent before the mark.
    tail, mark = sent_messages(codec.mark("utt-1"))
    assert base64.b64decode(tail["media"]["payload"]) == b"\x03" * 80 + b"\xff" * 80  # type: ignore[index]
    assert mark == {"event": "mark", "mark": {"name": "utt-1"}}
    assert sent_messages(codec.mark("utt-2")) == [{"event": "mark", "mark": {"name": "utt-2"}}]


def test_odd_chunks_reach_the_caller_without_inserted_silence() -> None:
    codec = TelnyxMediaCodec()
    speech = bytes(range(1, 128)) * 60  # no 0xff anywhere: any silence byte is inserted
    heard, offset = b"", 0
    for size in [159, 161, 7, 313, 160, 1, 499] * 5:
        heard += b"".join(played(sent_messages(codec.media(speech[offset:offset + size]))))
        offset += size
    heard += b"".join(played(sent_messages(codec.mark("end"))))
    assert heard[:offset] == speech[:offset] and set(heard[offset:]) <= {0xff}
    assert len(heard) % 160 == 0


def test_clear_drops_the_carry_and_long_audio_is_split_at_30s() -> None:
    codec = TelnyxMediaCodec()
    codec.media(b"\x05" * 100)
    assert sent_messages(codec.clear()) == [{"event": "clear"}]
    assert sent_messages(codec.mark("after-clear")) == [{"event": "mark", "mark": {"name": "after-clear"}}]
    chunks = played(sent_messages(codec.media(b"\x06" * (MAX_OUTBOUND_BYTES * 2 + 320))))
    assert [len(c) for c in chunks] == [MAX_OUTBOUND_BYTES, MAX_OUTBOUND_BYTES, 320]
