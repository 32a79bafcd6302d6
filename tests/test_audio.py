"""Rate conversion and G.711 for return audio (assumption §9.1) and the uplink L16 decoder, measured with numpy.

Every figure is computed from generated signals after the μ-law round trip, i.e. on what the caller hears.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray

from app.relay.audio import (DOWNLINK_16K_TAPS, DOWNLINK_24K_TAPS, UPLINK_16K_TAPS, DownlinkTranscoder, UnsupportedAudio,
                       UplinkDecoder, windowed_sinc_lowpass)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

AMPLITUDE = 16384.0  # -6 dBFS
FRAME_MS = 20


def tone(rate: int, seconds: float, freq: float, amplitude: float = AMPLITUDE) -> NDArray[np.float64]:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def pcm16(samples: NDArray[np.float64], order: str = "<") -> bytes:
    return np.clip(np.rint(samples), -32768, 32767).astype(f"{order}i2").tobytes()


def decode(mulaw: bytes) -> NDArray[np.float64]:
    return np.frombuffer(audioop.ulaw2lin(mulaw, 2), dtype=np.int16).astype(np.float64)


def utterance(pcm: bytes, rate: int, chunk_bytes: int | None = None) -> bytes:
    """One utterance through a fresh transcoder in ``chunk_bytes`` pieces (20 ms by default), then its end."""
    chunk_bytes = chunk_bytes or rate * 2 * FRAME_MS // 1000
    transcoder = DownlinkTranscoder()
    out = [transcoder.to_mulaw_8k(pcm[i:i + chunk_bytes], "pcm16", rate) for i in range(0, len(pcm), chunk_bytes)]
    return b"".join(out) + transcoder.end_utterance()


def former_ratecv(pcm: bytes, rate: int) -> bytes:
    """The former return-audio path (audioop.ratecv with its one-pole weights), to show the measures can fail."""
    return audioop.lin2ulaw(audioop.ratecv(pcm, 2, 1, rate, 8000, None, 1, 1)[0], 2)


def aliased_energy_db(convert: Callable[[bytes, int], bytes], rate: int, freq: float) -> float:
    """Output energy for an input tone above 4 kHz (all of it aliasing), in dB re the input tone's energy."""
    y = decode(convert(pcm16(tone(rate, 0.35, freq)), rate))[400:2400]  # 250 ms past the filter's start
    spectrum = np.fft.rfft(y) / len(y)
    energy = 2 * np.sum(np.abs(spectrum[1:-1]) ** 2) + abs(spectrum[0]) ** 2 + abs(spectrum[-1]) ** 2
    return 10 * math.log10(max(float(energy), 1e-12) / (AMPLITUDE ** 2 / 2))


def gain_db(convert: Callable[[bytes, int], bytes], rate: int, freq: int) -> float:
    """Gain at ``freq`` from its FFT bin in a 250 ms window (4 Hz bins: the test tones fall on bins exactly)."""
    y = decode(convert(pcm16(tone(rate, 0.35, freq)), rate))[400:2400]
    return 20 * math.log10(2 * abs(np.fft.rfft(y)[freq // 4]) / len(y) / AMPLITUDE)


def ulaw_steps(mulaw: bytes) -> NDArray[np.int64]:
    """μ-law bytes as signed quantiser step numbers (adjacent levels differ by 1)."""
    codes = np.frombuffer(mulaw, dtype=np.uint8).astype(np.int64)
    magnitude = 0x7F - (codes & 0x7F)
    return np.where(codes & 0x80, magnitude, -magnitude)


def random_splits(data: bytes, seed: int, largest: int = 1500) -> list[bytes]:
    """``data`` cut at seeded random points: odd sizes, single bytes and empty pieces included."""
    rng = np.random.default_rng(seed)
    pieces, i = [], 0
    while i < len(data):
        size = int(rng.choice([0, 1, 2, 3, int(rng.integers(1, largest))]))
        pieces.append(data[i:i + size])
        i += size
    return pieces


# -- return audio: formats --------------------------------------------------------------------------------------

def test_mulaw_8k_passes_through_untouched() -> None:
    data = bytes(range(256))
    transcoder = DownlinkTranscoder()
    assert transcoder.to_mulaw_8k(data, "mulaw", 8000) is data
    assert transcoder.end_utterance() == b""  # nothing pending for μ-law: no extra frame at an utterance's end


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_pcm16_utterance_becomes_as_many_mulaw_8k_samples_as_it_lasts(rate: int) -> None:
    pcm = pcm16(tone(rate, 0.5, 440.0, 12000))
    out = utterance(pcm, rate)
    assert len(out) == 4000  # 0.5 s at 8 kHz: the filter's delay is compensated, its tail flushed
    rms = float(np.sqrt(np.mean(decode(out)[200:3800] ** 2)))
    assert 12000 / math.sqrt(2) * 0.97 < rms < 12000 / math.sqrt(2) * 1.03


def test_pcm16_8k_is_only_mulaw_encoded_with_the_odd_byte_kept() -> None:
    pcm = pcm16(tone(8000, 0.1, 440.0))
    transcoder = DownlinkTranscoder()
    split = transcoder.to_mulaw_8k(pcm[:101], "linear16", 8000) + transcoder.to_mulaw_8k(pcm[101:], "linear16", 8000)
    assert split == audioop.lin2ulaw(np.frombuffer(pcm, "<i2").astype(np.int16).tobytes(), 2)


@pytest.mark.parametrize("encoding, rate", [("opus", 48000), ("pcm16", 44100), ("alaw", 8000), ("mulaw", 16000)])
def test_unsupported_formats_are_refused(encoding: str, rate: int) -> None:
    with pytest.raises(UnsupportedAudio):
        DownlinkTranscoder().to_mulaw_8k(b"\x00" * 10, encoding, rate)


# -- return audio: quality --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [16000, 24000])
def test_tones_between_4_5_and_11_khz_alias_at_most_minus_50_db(rate: int) -> None:
    sweep = [f for f in range(4500, 11001, 250) if f < rate / 2]
    aliasing = {f: aliased_energy_db(utterance, rate, f) for f in sweep}
    assert max(aliasing.values()) <= -50, aliasing


@pytest.mark.parametrize("rate", [16000, 24000])
def test_the_alias_measure_catches_the_former_ratecv_path(rate: int) -> None:
    assert aliased_energy_db(former_ratecv, rate, 5000) > -20  # it measured -6 to -9 dB


@pytest.mark.parametrize("rate", [16000, 24000])
def test_telephone_band_is_flat_within_1_db(rate: int) -> None:
    response = {f: gain_db(utterance, rate, f) for f in (300, 1000, 3000, 3400)}
    assert all(abs(g) <= 1.0 for g in response.values()), response
    assert gain_db(former_ratecv, rate, 3000) < -3  # the former path drooped: the measure can fail


@pytest.mark.parametrize("rate", [16000, 24000])
def test_added_delay_is_at_most_5_ms(rate: int) -> None:
    # Signal delay: the slope of the output's phase against the input's over 500–3000 Hz (250 Hz apart: a
    # delay up to ±2 ms is unambiguous, and a larger one would bend the fit and show in the residual).
    freqs = np.arange(500, 3001, 250)
    phases = np.random.default_rng(1).uniform(0, 2 * np.pi, len(freqs))
    t = np.arange(int(rate * 0.35)) / rate
    x = np.sum(2000 * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None]), axis=0)
    y = decode(utterance(pcm16(x), rate))[400:2400]
    ref = x[::rate // 8000][400:2400]  # the input at the output's instants
    bins = freqs // 4
    shift = np.unwrap(np.angle(np.fft.rfft(y)[bins] / np.fft.rfft(ref)[bins]))
    slope, residual = np.polyfit(2 * np.pi * freqs, shift, 1, full=True)[:2]
    signal_delay_ms = -slope[0] * 1000
    assert float(residual[0]) < 0.01
    # Latency: how much audio the transcoder holds back while Kallglot streams 20 ms chunks.
    transcoder, chunk = DownlinkTranscoder(), rate * 2 * FRAME_MS // 1000
    pcm, fed, emitted, held_ms = pcm16(x), 0, 0, 0.0
    for i in range(0, len(pcm), chunk):
        emitted += len(transcoder.to_mulaw_8k(pcm[i:i + chunk], "pcm16", rate))
        fed += len(pcm[i:i + chunk]) // 2
        held_ms = max(held_ms, (fed * 8000 / rate - emitted) / 8)
    assert abs(signal_delay_ms) + held_ms <= 5.0, (signal_delay_ms, held_ms)


@pytest.mark.parametrize("rate", [16000, 24000])
def test_output_bytes_do_not_depend_on_how_the_audio_is_chunked(rate: int) -> None:
    rng = np.random.default_rng(rate)
    # Noise loud enough to clip after the filter's overshoot, so rounding and saturation are covered too.
    pcm = pcm16(rng.normal(0, 9000, rate // 2))
    whole = utterance(pcm, rate, chunk_bytes=len(pcm))
    for seed in range(5):
        transcoder = DownlinkTranscoder()
        out = b"".join(transcoder.to_mulaw_8k(piece, "pcm16", rate) for piece in random_splits(pcm, seed))
        assert out + transcoder.end_utterance() == whole


@pytest.mark.parametrize("rate, taps", [(16000, DOWNLINK_16K_TAPS), (24000, DOWNLINK_24K_TAPS)])
def test_utterance_equals_a_delay_compensated_reference_convolution(rate: int, taps: NDArray[np.float64]) -> None:
    # Output m is the filter's value at input sample m·factor + delay: the ramp-up dropped, the tail flushed.
    x = np.clip(np.rint(np.random.default_rng(2).normal(0, 6000, 1001)), -32768, 32767)  # odd length
    factor, delay = rate // 8000, (len(taps) - 1) // 2
    reference = np.convolve(x, taps)[delay::factor][:math.ceil(len(x) / factor)]
    expected = audioop.lin2ulaw(np.clip(np.rint(reference), -32768, 32767).astype(np.int16).tobytes(), 2)
    assert utterance(pcm16(x), rate) == expected


def test_reset_drops_what_is_pending_and_the_next_utterance_starts_fresh() -> None:
    first, second = pcm16(tone(16000, 0.1, 700.0)), pcm16(tone(16000, 0.1, 1100.0))
    transcoder = DownlinkTranscoder()
    transcoder.to_mulaw_8k(first + b"\x01", "pcm16", 16000)  # with a dangling odd byte
    transcoder.reset()
    assert transcoder.to_mulaw_8k(second, "pcm16", 16000) + transcoder.end_utterance() == utterance(second, 16000)


def test_a_format_switch_ends_the_utterance_in_progress() -> None:
    wide, mulaw = pcm16(tone(24000, 0.1, 700.0)), b"\xff" * 160
    transcoder = DownlinkTranscoder()
    out = transcoder.to_mulaw_8k(wide[:2000], "pcm16", 24000)
    out += transcoder.to_mulaw_8k(wide[2000:], "pcm16", 24000)
    out += transcoder.to_mulaw_8k(mulaw, "mulaw", 8000)
    assert out == utterance(wide, 24000) + mulaw


# -- uplink: L16 16 kHz ------------------------------------------------------------------------------------------

def uplink(payload: bytes, pieces: list[bytes] | None = None) -> bytes:
    decoder = UplinkDecoder.for_format("L16", 16000)
    pieces = pieces if pieces is not None else [payload[i:i + 640] for i in range(0, len(payload), 640)]
    return b"".join(decoder.to_mulaw_8k(piece) for piece in pieces)


def convolve_reference(samples: NDArray[np.float64], taps: NDArray[np.float64]) -> bytes:
    """Causal FIR by np.convolve, every other output from the first, rounded and saturated, as μ-law."""
    filtered = np.convolve(samples, taps)[:len(samples)][::2]
    return audioop.lin2ulaw(np.clip(np.rint(filtered), -32768, 32767).astype(np.int16).tobytes(), 2)


def uplink_signal() -> NDArray[np.float64]:
    rng = np.random.default_rng(16)
    speechish = tone(16000, 0.5, 210.0, 9000) + tone(16000, 0.5, 2300.0, 4000) + tone(16000, 0.5, 6100.0, 6000)
    return np.clip(np.rint(speechish + rng.normal(0, 3000, 8000)), -32768, 32767)  # peaks clip the filter


def test_uplink_decimator_equals_a_reference_convolution() -> None:
    x = uplink_signal()
    assert uplink(pcm16(x, ">")) == convolve_reference(x, UPLINK_16K_TAPS)


def test_uplink_decimator_is_within_one_mulaw_step_of_the_unquantised_filter() -> None:
    # The filter is still the 65-tap Hamming sinc at 3.6 kHz; only its taps are rounded to 2**-24 so that
    # float sums are exact. Against the unrounded filter the μ-law output moves at most one step.
    x = uplink_signal()
    exact = windowed_sinc_lowpass(np.hamming(65), 3600.0, 16000)
    hamming = np.sinc(2 * 3600 / 16000 * (np.arange(65) - 32)) * np.hamming(65)
    unquantised = hamming / hamming.sum()
    assert np.max(np.abs(exact - unquantised)) < 2.0 ** -24
    steps = ulaw_steps(uplink(pcm16(x, ">"))) - ulaw_steps(convolve_reference(x, unquantised))
    assert int(np.max(np.abs(steps))) <= 1


def test_uplink_decimator_does_not_depend_on_frame_splits() -> None:
    payload = pcm16(uplink_signal(), ">")
    whole = uplink(payload, [payload])
    for seed in range(3):
        assert uplink(payload, random_splits(payload, seed, largest=700)) == whole
