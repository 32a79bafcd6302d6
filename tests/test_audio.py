"""Return-audio transcoding to μ-law 8 kHz (assumption §9.1)."""
from __future__ import annotations

import math
import struct
import warnings

import pytest

from app.relay.audio import DownlinkTranscoder, UnsupportedAudio

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def tone(rate: int, seconds: float, freq: float = 440.0) -> bytes:
    samples = [int(12000 * math.sin(2 * math.pi * freq * n / rate)) for n in range(int(rate * seconds))]
    return struct.pack(f"<{len(samples)}h", *samples)


def test_mulaw_8k_passes_through_untouched() -> None:
    data = bytes(range(256))
    assert DownlinkTranscoder().to_mulaw_8k(data, "mulaw", 8000) is data


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_pcm16_is_converted_to_mulaw_8k(rate: int) -> None:
    pcm = tone(rate, 0.5)
    out = DownlinkTranscoder().to_mulaw_8k(pcm, "pcm16", rate)
    assert abs(len(out) - 4000) <= 2  # 0.5 s at 8 kHz, one byte per sample
    decoded = audioop.ulaw2lin(out, 2)
    # The tone survives: its RMS is close to the original's (12000/√2 ≈ 8485).
    assert 7000 < audioop.rms(decoded[200:], 2) < 9500


def test_odd_byte_split_across_messages_is_kept() -> None:
    pcm = tone(8000, 0.1)
    transcoder = DownlinkTranscoder()
    whole = DownlinkTranscoder().to_mulaw_8k(pcm, "linear16", 8000)
    assert transcoder.to_mulaw_8k(pcm[:101], "linear16", 8000) + transcoder.to_mulaw_8k(pcm[101:], "linear16", 8000) \
        == whole


@pytest.mark.parametrize("encoding, rate", [("opus", 48000), ("pcm16", 44100), ("alaw", 8000)])
def test_unsupported_formats_are_refused(encoding: str, rate: int) -> None:
    with pytest.raises(UnsupportedAudio):
        DownlinkTranscoder().to_mulaw_8k(b"\x00" * 10, encoding, rate)
