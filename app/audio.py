"""Audio conversions for return audio that is not already μ-law 8 kHz (kallglot-api.md §9.1).

G.711 and rate conversion use ``audioop`` (stdlib up to 3.12; the ``audioop-lts`` backport on ≥ 3.13).
"""
from __future__ import annotations

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
