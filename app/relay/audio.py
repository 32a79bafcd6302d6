"""Audio conversions for return audio that is not already μ-law 8 kHz (assumption 1 in :mod:`app.kallglot.stream_protocol`).

G.711 and rate conversion use ``audioop`` (stdlib up to 3.12; the ``audioop-lts`` backport on ≥ 3.13).
"""
from __future__ import annotations

import math
import sys
import warnings

with warnings.catch_warnings():
    # Deprecated on 3.11/3.12 but present; on 3.13+ audioop-lts provides the same module silently.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

MULAW_ALIASES = frozenset({"mulaw", "ulaw", "pcmu", "g711_ulaw", "audio/x-mulaw"})
PCM16_LE_ALIASES = frozenset({"pcm16", "pcm_16", "linear16", "l16le", "s16le"})
SUPPORTED_RATES = frozenset({8000, 16000, 24000})
TARGET_RATE = 8000


class UnsupportedAudio(ValueError):
    """Return audio in an encoding or rate the relay cannot play; it is dropped (and logged once)."""


class DownlinkTranscoder:
    """Converts one leg's return audio to μ-law 8 kHz, keeping resampler state across chunks."""

    def __init__(self) -> None:
        self._ratecv_state: object = None
        self._ratecv_rate: int | None = None
        self._odd_byte = b""

    def to_mulaw_8k(self, payload: bytes, encoding: str, sample_rate_hz: int) -> bytes:
        """Return ``payload`` as μ-law 8 kHz mono, or raise :class:`UnsupportedAudio`."""
        if encoding in MULAW_ALIASES and sample_rate_hz == TARGET_RATE:
            return payload
        if encoding not in PCM16_LE_ALIASES or sample_rate_hz not in SUPPORTED_RATES:
            raise UnsupportedAudio(f"{encoding} at {sample_rate_hz} Hz")
        pcm = self._odd_byte + payload
        # A 16-bit sample split across two messages: keep the odd byte for the next chunk.
        if len(pcm) % 2:
            pcm, self._odd_byte = pcm[:-1], pcm[-1:]
        else:
            self._odd_byte = b""
        if sys.byteorder == "big":  # audioop works in native order; the assumption is little-endian input
            pcm = audioop.byteswap(pcm, 2)
        if sample_rate_hz != TARGET_RATE:
            if self._ratecv_rate != sample_rate_hz:
                self._ratecv_state, self._ratecv_rate = None, sample_rate_hz
            # weightA/weightB = 1/1 adds a one-pole low-pass, which tames aliasing on down-sampling.
            pcm, self._ratecv_state = audioop.ratecv(pcm, 2, 1, sample_rate_hz, TARGET_RATE,
                                                     self._ratecv_state, 1, 1)
        return audioop.lin2ulaw(pcm, 2)


# -- uplink: carrier codecs other than μ-law 8 kHz (Telnyx PCMA / L16 legs) -------------------------------------

PCMA_ALIASES = frozenset({"pcma", "alaw", "g711_alaw", "audio/x-alaw"})
L16_BE_ALIASES = frozenset({"l16"})  # RTP L16 is big-endian (network order), RFC 3551 §4.5.11

#: Anti-alias low-pass for 16 kHz → 8 kHz: a 65-tap Hamming-windowed sinc, cut-off 3.6 kHz (passband flat to
#: ~3.3 kHz, ≥ 50 dB down above ~4.1 kHz). 65 taps put the group delay at exactly 16 output samples (2 ms).
#: ``audioop.ratecv`` alone only averages neighbours, which lets 4–8 kHz content alias into the speech band.
DECIMATION_TAPS = 65
DECIMATION_CUTOFF_HZ = 3600.0


def _lowpass_taps(count: int, cutoff_hz: float, rate_hz: int) -> tuple[float, ...]:
    """Windowed-sinc low-pass taps, normalised to unity gain at DC."""
    middle = (count - 1) / 2
    fc = cutoff_hz / rate_hz
    taps = []
    for n in range(count):
        x = n - middle
        sinc = 2 * fc if x == 0 else math.sin(2 * math.pi * fc * x) / (math.pi * x)
        taps.append(sinc * (0.54 - 0.46 * math.cos(2 * math.pi * n / (count - 1))))
    total = sum(taps)
    return tuple(t / total for t in taps)


class UplinkDecoder:
    """Turns one caller leg's frames (PCMU, PCMA or L16 big-endian at 8/16 kHz) into μ-law 8 kHz.

    Stateful per leg: keeps a byte split across frames and the decimation filter's history, so frame
    boundaries leave no clicks. Build it with :meth:`for_format`, which refuses what it cannot decode.
    """

    def __init__(self, encoding: str, sample_rate_hz: int) -> None:
        self.encoding, self.sample_rate_hz = encoding, sample_rate_hz
        self._odd_byte = b""
        taps = _lowpass_taps(DECIMATION_TAPS, DECIMATION_CUTOFF_HZ, 16000) if sample_rate_hz == 16000 else ()
        self._taps = taps
        # The last len(taps)-1 input samples as 32-bit values, so the filter runs across frame boundaries.
        self._history = bytes(4 * max(len(taps) - 1, 0))
        self._phase = 0  # index, within the next frame, of the first sample the 2:1 decimation keeps

    @classmethod
    def for_format(cls, encoding: str, sample_rate_hz: int) -> UplinkDecoder:
        """A decoder for ``encoding`` at ``sample_rate_hz``, or :class:`UnsupportedAudio`."""
        name = encoding.strip().lower()
        if (name in MULAW_ALIASES or name in PCMA_ALIASES) and sample_rate_hz == TARGET_RATE:
            return cls(name, sample_rate_hz)
        if name in L16_BE_ALIASES and sample_rate_hz in (8000, 16000):
            return cls(name, sample_rate_hz)
        raise UnsupportedAudio(f"{encoding} at {sample_rate_hz} Hz")

    @property
    def passthrough(self) -> bool:
        """True when frames already are μ-law 8 kHz."""
        return self.encoding in MULAW_ALIASES

    def to_mulaw_8k(self, payload: bytes) -> bytes:
        """Decode one frame to μ-law 8 kHz."""
        if self.encoding in MULAW_ALIASES:
            return payload
        if self.encoding in PCMA_ALIASES:
            return audioop.lin2ulaw(audioop.alaw2lin(payload, 2), 2)
        pcm = self._odd_byte + payload
        if len(pcm) % 2:
            pcm, self._odd_byte = pcm[:-1], pcm[-1:]
        else:
            self._odd_byte = b""
        if sys.byteorder == "little":  # L16 is big-endian on the wire; audioop works in native order
            pcm = audioop.byteswap(pcm, 2)
        if self._taps:
            pcm = self._decimate(pcm)
        return audioop.lin2ulaw(pcm, 2)

    def _decimate(self, pcm: bytes) -> bytes:
        """Low-pass filter 16 kHz PCM and keep every other sample (vector arithmetic through ``audioop``)."""
        if not pcm:
            return b""
        # 32-bit working samples (lin2lin scales by 2**16) with two bits of headroom for the filter's gain.
        wide = self._history + audioop.mul(audioop.lin2lin(pcm, 2, 4), 4, 0.25)
        taps, count = self._taps, len(pcm) // 2
        # Outputs are at input positions n ≡ phase (mod 2); y[n] = Σ_k h[k]·x[n-k] over the wide buffer,
        # where x[n-k] sits at index (len(history)/4 + n - k).
        first = self._phase
        positions = range(first, count, 2)
        out_count = len(positions)
        self._phase = (first - count) % 2  # the next frame's first kept index, so the 2:1 grid never slips
        acc = bytes(4 * out_count)
        offset = len(taps) - 1
        for k, h in enumerate(taps):
            start = offset + first - k
            # Every second 32-bit sample from `start`: strided view via memoryview cast.
            column = memoryview(wide).cast("i")[start:start + 2 * out_count:2].tobytes()
            acc = audioop.add(acc, audioop.mul(column, 4, h), 4)
        self._history = wide[len(wide) - 4 * offset:]
        return audioop.lin2lin(audioop.mul(acc, 4, 4.0), 4, 2)
