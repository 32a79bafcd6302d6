"""Speech-like test signals and how to score a decoded copy against them."""
from __future__ import annotations

import math
import struct


def voiced(rate: int, seconds: float) -> list[float]:
    """Speech-like signal: a gliding 120–160 Hz voice with harmonics to ~3 kHz, syllables at 4 Hz, pauses.

    Computed from continuous time, so the same call at 8 and 16 kHz samples the same waveform.
    """
    out = []
    for i in range(int(rate * seconds)):
        t = i / rate
        # The integral of a 140 ± 20 Hz pitch contour (closed form: identical waveforms at any rate).
        phase = 2 * math.pi * 140.0 * t - (20.0 / 0.7) * math.cos(2 * math.pi * 0.7 * t)
        envelope = 0.0 if (t % 1.0) > 0.8 else math.sin(math.pi * ((t * 4.0) % 1.0)) ** 2
        out.append(7000.0 * envelope * sum(math.sin(k * phase) / k for k in range(1, 19)))
    return out


def pcm(samples: list[float], order: str = "=") -> bytes:
    """16-bit PCM of ``samples`` (``>`` big-endian, ``=`` native)."""
    return struct.pack(f"{order}{len(samples)}h", *(int(round(v)) for v in samples))


def snr_db(reference: list[float] | tuple[int, ...], decoded: tuple[int, ...], lag: int = 0) -> float:
    """Signal-to-noise ratio of ``decoded`` (shifted by ``lag`` samples) against ``reference``."""
    n = min(len(reference), len(decoded) - lag)
    signal = sum(reference[i] ** 2 for i in range(n))
    noise = sum((reference[i] - decoded[i + lag]) ** 2 for i in range(n)) or 1e-9
    return 10 * math.log10(signal / noise)


def samples(data: bytes) -> tuple[int, ...]:
    """16-bit native-endian PCM bytes as sample values."""
    return struct.unpack(f"={len(data) // 2}h", data)
