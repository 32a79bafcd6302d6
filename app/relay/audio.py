"""Audio conversions to μ-law 8 kHz: Kallglot's return audio (assumption 1 in :mod:`app.kallglot.stream_protocol`)
and non-μ-law carrier legs.

G.711 encode/decode uses ``audioop`` (stdlib up to 3.12; the ``audioop-lts`` backport on ≥ 3.13). Rate
conversion (16/24 kHz → 8 kHz) is a stateful FIR low-pass + decimator in numpy (:class:`FirDecimator`).

Why not ``soxr``'s streaming resampler: measured with soxr 1.1 (``python -m app.devtools.audio_quality``),
``ResampleStream`` at quality HQ/VHQ holds back up to 73–152 ms of audio when fed 20 ms chunks (the budget for
a live call is 5 ms), and with ``dtype=int16`` its output changes by up to 2 LSB with the chunking (float32
was chunk-independent). soxr stays the quality reference in that script.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
from numpy.typing import NDArray

with warnings.catch_warnings():
    # Deprecated on 3.11/3.12 but present; on 3.13+ audioop-lts provides the same module silently.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

MULAW_ALIASES = frozenset({"mulaw", "ulaw", "pcmu", "g711_ulaw", "audio/x-mulaw"})
PCM16_LE_ALIASES = frozenset({"pcm16", "pcm_16", "linear16", "l16le", "s16le"})
SUPPORTED_RATES = frozenset({8000, 16000, 24000})
TARGET_RATE = 8000

#: Taps are rounded to multiples of 2**-TAP_FRACTION_BITS. With 16-bit samples every product and every partial
#: sum is then an exact float64 (≤ 16 + 1 + 24 significant bits < 53), so a filter output does not depend on the
#: order numpy/BLAS sums in — which is what makes the output byte-identical however the input is chunked.
TAP_FRACTION_BITS = 24


class UnsupportedAudio(ValueError):
    """Return audio in an encoding or rate the relay cannot play; it is dropped (and logged once)."""


def windowed_sinc_lowpass(window: NDArray[np.float64], cutoff_hz: float, rate_hz: int) -> NDArray[np.float64]:
    """Linear-phase low-pass taps (sinc × ``window``), unity gain at DC, quantised for exact arithmetic.

    The result is read-only so it can be shared between decimators.
    """
    count = len(window)
    fc = cutoff_hz / rate_hz
    taps = 2 * fc * np.sinc(2 * fc * (np.arange(count) - (count - 1) / 2)) * window
    taps = np.round(taps / taps.sum() * 2.0 ** TAP_FRACTION_BITS) * 2.0 ** -TAP_FRACTION_BITS
    taps.setflags(write=False)
    return taps


#: Return audio (Kallglot pcm16 at 16/24 kHz → 8 kHz). Kaiser β = 6.5, cut-off 3.95 kHz: passband flat within
#: ±0.01 dB to 3.4 kHz and ≥ 66 dB down from 4.5 kHz up, so what folds into 0–3.5 kHz is ≥ 66 dB down.
#: 65 taps at 16 kHz and 97 at 24 kHz both give a group delay of 32/48 input samples = 16 output samples = 2 ms.
DOWNLINK_CUTOFF_HZ = 3950.0
DOWNLINK_KAISER_BETA = 6.5
DOWNLINK_16K_TAPS = windowed_sinc_lowpass(np.kaiser(65, DOWNLINK_KAISER_BETA), DOWNLINK_CUTOFF_HZ, 16000)
DOWNLINK_24K_TAPS = windowed_sinc_lowpass(np.kaiser(97, DOWNLINK_KAISER_BETA), DOWNLINK_CUTOFF_HZ, 24000)


class FirDecimator:
    """Stateful FIR low-pass followed by keeping every ``factor``-th sample (int16 in, int16 out).

    The state is the input tail that the next output's window still needs; its length also encodes the
    decimation phase, so feeding a stream in any split gives the same samples (see :data:`TAP_FRACTION_BITS`
    for why they are identical to the last bit).

    With ``align=True`` the filter's group delay is compensated: the first ``delay/factor`` outputs (the
    filter's ramp-up) are dropped and :meth:`flush` emits as many at the end, so an utterance of ``n`` input
    samples becomes exactly ``ceil(n / factor)`` output samples, time-aligned with the input. The audio is still
    held back by the group delay while streaming (2 ms for the return-audio filters).
    """

    def __init__(self, taps: NDArray[np.float64], factor: int, *, align: bool) -> None:
        if align and (len(taps) % 2 == 0 or (len(taps) - 1) // 2 % factor):
            raise ValueError("align needs an odd tap count whose group delay is a whole number of outputs")
        self.factor = factor
        #: Group delay in input samples.
        self.delay = (len(taps) - 1) // 2
        self._align = align
        # np.correlate slides the taps without reversing them; reversed, it computes the convolution.
        self._reversed = np.ascontiguousarray(taps[::-1])
        self._history: NDArray[np.float64] = np.zeros(len(taps) - 1)
        self._skip = self.delay // factor if align else 0

    def reset(self) -> None:
        """Forget all state (silence before the next sample), e.g. on a barge-in or between utterances."""
        self._history = np.zeros(len(self._reversed) - 1)
        self._skip = self.delay // self.factor if self._align else 0

    def process(self, samples: NDArray[np.int16]) -> NDArray[np.int16]:
        """Filter and decimate the next ``samples``; returns the outputs they complete (possibly none)."""
        taps = len(self._reversed)
        buffer = np.concatenate((self._history, samples), dtype=np.float64)  # exact for int16 × quantised taps
        count = -(-(len(buffer) - taps + 1) // self.factor)  # outputs whose window ends inside the buffer
        if count <= 0:
            self._history = buffer
            return np.zeros(0, dtype=np.int16)
        # Output m's window is buffer[m·factor : m·factor + taps]. Correlating over every position and striding
        # does factor× the multiplications but in one C call, which beats a per-phase loop at 20 ms frames.
        out = np.correlate(buffer[:(count - 1) * self.factor + taps], self._reversed, "valid")[::self.factor]
        self._history = buffer[count * self.factor:]
        if self._skip:
            dropped = min(self._skip, len(out))
            out, self._skip = out[dropped:], self._skip - dropped
        # Round to nearest and saturate (a sharp filter overshoots on full-scale input). np.clip costs ~5 µs
        # per call on small arrays; maximum/minimum in place do the same in ~2 µs.
        np.rint(out, out=out)
        np.maximum(out, -32768.0, out=out)
        np.minimum(out, 32767.0, out=out)
        return out.astype(np.int16)

    def flush(self) -> NDArray[np.int16]:
        """The outputs still inside the filter (input followed by silence), then :meth:`reset`."""
        tail = self.process(np.zeros(self.delay, dtype=np.int16)) if self._align else np.zeros(0, np.int16)
        self.reset()
        return tail


def _downlink_decimator(sample_rate_hz: int) -> FirDecimator | None:
    """The return-audio decimator for ``sample_rate_hz`` (None at 8 kHz: nothing to resample)."""
    if sample_rate_hz == 16000:
        return FirDecimator(DOWNLINK_16K_TAPS, 2, align=True)
    if sample_rate_hz == 24000:
        return FirDecimator(DOWNLINK_24K_TAPS, 3, align=True)
    return None


class DownlinkTranscoder:
    """Converts one leg's return audio to μ-law 8 kHz, keeping filter state across chunks of an utterance.

    Output bytes do not depend on how Kallglot splits its audio into messages (odd byte counts included). The
    relay calls :meth:`end_utterance` when Kallglot's audio pauses, to play the last 2 ms still in the filter,
    and :meth:`reset` on a barge-in.
    """

    def __init__(self) -> None:
        self._rate: int | None = None  # rate of the pcm16 stream in progress (None: none in progress)
        self._decimator: FirDecimator | None = None
        self._odd_byte = b""

    def to_mulaw_8k(self, payload: bytes, encoding: str, sample_rate_hz: int) -> bytes:
        """Return ``payload`` as μ-law 8 kHz mono, or raise :class:`UnsupportedAudio`.

        μ-law 8 kHz comes back as the very same object (zero-copy), unless a pcm16 stream's tail is pending.
        """
        if encoding in MULAW_ALIASES and sample_rate_hz == TARGET_RATE:
            if self._decimator is None:
                self._rate, self._odd_byte = None, b""  # ends a pcm16 8 kHz stream, if any (nothing pending)
                return payload
            return self.end_utterance() + payload  # a format switch ends the pcm16 utterance: its tail first
        if encoding not in PCM16_LE_ALIASES or sample_rate_hz not in SUPPORTED_RATES:
            raise UnsupportedAudio(f"{encoding} at {sample_rate_hz} Hz")
        head = b""
        if sample_rate_hz != self._rate:
            head = self.end_utterance()  # a rate switch: finish the old filter, start a fresh one
            self._rate, self._decimator = sample_rate_hz, _downlink_decimator(sample_rate_hz)
        pcm = self._odd_byte + payload
        # A 16-bit sample split across two messages: keep the odd byte for the next chunk.
        if len(pcm) % 2:
            pcm, self._odd_byte = pcm[:-1], pcm[-1:]
        else:
            self._odd_byte = b""
        if self._decimator is None:  # pcm16 at 8 kHz: only the G.711 encoding
            if sys.byteorder == "big":  # audioop works in native order; the assumption is little-endian input
                pcm = audioop.byteswap(pcm, 2)
            return head + audioop.lin2ulaw(pcm, 2)
        out = self._decimator.process(np.frombuffer(pcm, dtype="<i2"))
        return head + audioop.lin2ulaw(out.tobytes(), 2)

    def end_utterance(self) -> bytes:
        """μ-law for the audio still inside the filter; the next chunk starts a new utterance from silence.

        Returns ``b""`` when nothing is pending (μ-law or 8 kHz return audio). A dangling odd byte is dropped:
        half a sample cannot be played.
        """
        decimator, self._decimator, self._rate, self._odd_byte = self._decimator, None, None, b""
        if decimator is None:
            return b""
        tail = decimator.flush()
        return audioop.lin2ulaw(tail.tobytes(), 2) if len(tail) else b""

    def reset(self) -> None:
        """Drop whatever is pending without playing it (barge-in: the caller must hear nothing more of it)."""
        self._decimator, self._rate, self._odd_byte = None, None, b""


# -- uplink: carrier codecs other than μ-law 8 kHz (Telnyx PCMA / L16 legs) -------------------------------------

PCMA_ALIASES = frozenset({"pcma", "alaw", "g711_alaw", "audio/x-alaw"})
L16_BE_ALIASES = frozenset({"l16"})  # RTP L16 is big-endian (network order), RFC 3551 §4.5.11

#: Anti-alias low-pass for 16 kHz → 8 kHz: a 65-tap Hamming-windowed sinc, cut-off 3.6 kHz (passband flat to
#: ~3.3 kHz, ≥ 50 dB down above ~4.1 kHz). 65 taps put the group delay at exactly 16 output samples (2 ms).
#: ``audioop.ratecv`` alone only averages neighbours, which lets 4–8 kHz content alias into the speech band.
#: Not delay-compensated (the uplink is one continuous stream, never flushed): output m is at input 2m.
DECIMATION_TAPS = 65
DECIMATION_CUTOFF_HZ = 3600.0
UPLINK_16K_TAPS = windowed_sinc_lowpass(np.hamming(DECIMATION_TAPS), DECIMATION_CUTOFF_HZ, 16000)


class UplinkDecoder:
    """Turns one caller leg's frames (PCMU, PCMA or L16 big-endian at 8/16 kHz) into μ-law 8 kHz.

    Stateful per leg: keeps a byte split across frames and the decimation filter's history, so frame
    boundaries leave no clicks. Build it with :meth:`for_format`, which refuses what it cannot decode.
    """

    def __init__(self, encoding: str, sample_rate_hz: int) -> None:
        self.encoding, self.sample_rate_hz = encoding, sample_rate_hz
        self._odd_byte = b""
        self._decimator = FirDecimator(UPLINK_16K_TAPS, 2, align=False) if sample_rate_hz == 16000 else None

    @classmethod
    def for_format(cls, encoding: str, sample_rate_hz: int) -> UplinkDecoder:
        """A decoder for ``encoding`` at ``sample_rate_hz``, or :class:`UnsupportedAudio`."""
        name = encoding.strip().lower()
        if (name in MULAW_ALIASES or name in PCMA_ALIASES) and sample_rate_hz == TARGET_RATE:
            return cls(name, sample_rate_hz)
        if name in L16_BE_ALIASES and sample_rate_hz in (8000, 16000):
            return cls(name, sample_rate_hz)
        raise UnsupportedAudio(f"{encoding} at {sample_rate_hz} Hz")

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
        if self._decimator is not None:
            return audioop.lin2ulaw(self._decimator.process(np.frombuffer(pcm, dtype=">i2")).tobytes(), 2)
        if sys.byteorder == "little":  # L16 is big-endian on the wire; audioop works in native order
            pcm = audioop.byteswap(pcm, 2)
        return audioop.lin2ulaw(pcm, 2)
