"""WAV helpers for the call simulator: everything on the wire is G.711 μ-law, 8 kHz, mono."""
from __future__ import annotations

import array
import io
import math
import struct
import sys
import warnings
import wave
from pathlib import Path

with warnings.catch_warnings():
    # audioop is deprecated on 3.11/3.12 (PEP 594); on >=3.13 the audioop-lts backport provides it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SAMPLE_RATE = 8000
_FORMAT_PCM, _FORMAT_MULAW, _FORMAT_EXTENSIBLE = 0x0001, 0x0007, 0xFFFE


def _riff_chunks(data: bytes) -> dict[bytes, bytes]:
    """Split a RIFF/WAVE file into its top-level chunks (first occurrence of each id wins)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        chunks.setdefault(cid, data[pos + 8:pos + 8 + size])
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return chunks


def wav_bytes_to_ulaw(data: bytes) -> bytes:
    """Convert WAV file contents (PCM16 or μ-law, mono or stereo, any rate) to raw μ-law 8 kHz mono."""
    chunks = _riff_chunks(data)
    if b"fmt " not in chunks or b"data" not in chunks:
        raise ValueError("WAV file lacks a fmt or data chunk")
    fmt = chunks[b"fmt "]
    tag, channels, rate = struct.unpack_from("<HHI", fmt, 0)
    bits = struct.unpack_from("<H", fmt, 14)[0]
    if tag == _FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # first two bytes of the SubFormat GUID
    payload = chunks[b"data"]
    if tag == _FORMAT_MULAW and bits == 8:
        pcm = audioop.ulaw2lin(payload, 2)
    elif tag == _FORMAT_PCM and bits == 16:
        pcm = payload[: len(payload) - len(payload) % (2 * channels)]
        if sys.byteorder == "big":
            pcm = audioop.byteswap(pcm, 2)  # WAV is little-endian, audioop works in native order
    else:
        raise ValueError(f"unsupported WAV encoding (format tag {tag:#x}, {bits} bits); use PCM16 or μ-law")
    if channels == 2:
        pcm = audioop.tomono(pcm, 2, 0.5, 0.5)
    elif channels != 1:
        raise ValueError(f"unsupported channel count {channels}")
    if rate != SAMPLE_RATE:
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate, SAMPLE_RATE, None)
    if tag == _FORMAT_MULAW and rate == SAMPLE_RATE and channels == 1:
        return bytes(payload)  # already wire format: avoid a lossy round trip
    return audioop.lin2ulaw(pcm, 2)


def read_wav_as_ulaw(path: str | Path) -> bytes:
    """Read a WAV file from disk and return raw μ-law 8 kHz mono bytes."""
    return wav_bytes_to_ulaw(Path(path).read_bytes())


def ulaw_to_wav_bytes(ulaw: bytes) -> bytes:
    """Wrap μ-law 8 kHz mono audio as a PCM16 WAV (plays everywhere, unlike μ-law WAVs)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        pcm = audioop.ulaw2lin(ulaw, 2)
        out.writeframes(audioop.byteswap(pcm, 2) if sys.byteorder == "big" else pcm)
    return buf.getvalue()


def write_ulaw_as_wav(path: str | Path, ulaw: bytes) -> None:
    """Write μ-law 8 kHz mono audio to ``path`` as a PCM16 WAV file."""
    Path(path).write_bytes(ulaw_to_wav_bytes(ulaw))


def speech_like_tone(seconds: float) -> bytes:
    """Deterministic speech-like μ-law signal: a gliding voiced harmonic stack with syllable-rate bursts.

    Servers doing voice-activity detection treat a pure sine as noise, so this mimics speech's
    structure: ~120-160 Hz pitch with decaying harmonics, ~4 syllables/s, and a short pause each second.
    """
    n = max(0, int(round(seconds * SAMPLE_RATE)))
    samples = array.array("h", bytes(2 * n))
    phase = 0.0
    for i in range(n):
        t = i / SAMPLE_RATE
        f0 = 140.0 + 20.0 * math.sin(2 * math.pi * 0.7 * t)  # slow intonation contour
        phase += 2 * math.pi * f0 / SAMPLE_RATE
        voiced = sum(math.sin(k * phase) / k for k in range(1, 6))
        envelope = math.sin(math.pi * ((t * 4.0) % 1.0)) ** 2  # syllables at 4 Hz
        if (t % 1.0) > 0.8:
            envelope = 0.0  # inter-phrase pause
        samples[i] = int(6000.0 * envelope * voiced)
    return audioop.lin2ulaw(samples.tobytes(), 2)  # array and audioop both use native byte order
