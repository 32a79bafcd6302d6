"""Measure the rate conversion to μ-law 8 kHz, before and now (long: one script, old code kept verbatim).

Before is ``audioop.ratecv``, now is :mod:`app.relay.audio`.

Run ``python -m app.devtools.audio_quality``. For the 16 and 24 kHz return-audio paths it prints the aliasing
of tones between 4.5 and 11 kHz, the band response, the delay, and the CPU time per 20 ms frame; with the
optional ``audio-quality`` extra (soxr, pesq, pystoi) also PESQ and STOI (narrowband) against a soxr VHQ
reference, on speech from ``espeak-ng`` when it is installed (else a synthetic speech-like signal), and how
``soxr.ResampleStream`` itself would do in the relay (audio held back, chunk dependence). It then compares
the uplink L16 16 kHz decimator with its former ``audioop`` implementation.

The "before" implementations are copied here, as they were, so the comparison stays reproducible after they
left :mod:`app.relay.audio`.
"""
from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
import time
import timeit
import warnings
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.relay.audio import DownlinkTranscoder, UplinkDecoder

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

#: Converts a whole utterance of pcm16 little-endian bytes at a rate to μ-law 8 kHz bytes, fed in chunks.
Converter = Callable[[bytes, int, int], bytes]

#: ``audioop.ratecv``'s filter state between calls.
RatecvState = tuple[int, tuple[tuple[int, int], ...]] | None

FRAME_MS = 20
ALIAS_TONES_HZ = tuple(range(4500, 11001, 250))
#: Not 2000 Hz: at a quarter of 8 kHz a tone hits only 3 sample values, and μ-law's error on them is coherent.
BAND_TONES_HZ = (300, 1000, 2100, 3000, 3400, 3600, 3800)
SPEECH_TEXT = ("The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore; "
               "six thick thistle sticks. Please call Stella and ask her to bring these things with her.")


# -- the converters under test ---------------------------------------------------------------------------------

def before(pcm: bytes, rate: int, chunk_bytes: int) -> bytes:
    """The former return-audio path: ``audioop.ratecv`` with weights 1/1 (a one-pole low-pass), then μ-law."""
    state: RatecvState = None
    out = []
    for i in range(0, len(pcm), chunk_bytes):
        chunk = pcm[i:i + chunk_bytes]
        if rate != 8000:
            chunk, state = audioop.ratecv(chunk, 2, 1, rate, 8000, state, 1, 1)
        out.append(audioop.lin2ulaw(chunk, 2))
    return b"".join(out)


def now(pcm: bytes, rate: int, chunk_bytes: int) -> bytes:
    """The current return-audio path: :class:`DownlinkTranscoder`, chunk by chunk, then the utterance's end."""
    transcoder = DownlinkTranscoder()
    out = [transcoder.to_mulaw_8k(pcm[i:i + chunk_bytes], "pcm16", rate) for i in range(0, len(pcm), chunk_bytes)]
    return b"".join(out) + transcoder.end_utterance()


def old_lowpass_taps(count: int, cutoff_hz: float, rate_hz: int) -> tuple[float, ...]:
    """The former ``app.relay.audio._lowpass_taps``: Hamming-windowed sinc, unity DC gain, unquantised."""
    middle = (count - 1) / 2
    fc = cutoff_hz / rate_hz
    taps = []
    for n in range(count):
        x = n - middle
        sinc = 2 * fc if x == 0 else math.sin(2 * math.pi * fc * x) / (math.pi * x)
        taps.append(sinc * (0.54 - 0.46 * math.cos(2 * math.pi * n / (count - 1))))
    total = sum(taps)
    return tuple(t / total for t in taps)


def old_uplink_decimate(pcm: bytes, frame_bytes: int) -> bytes:
    """The former ``UplinkDecoder._decimate`` (audioop vector arithmetic, 32-bit) for L16 16 kHz, as μ-law."""
    taps = old_lowpass_taps(65, 3600.0, 16000)
    history, phase, out = bytes(4 * 64), 0, []
    for i in range(0, len(pcm), frame_bytes):
        native = audioop.byteswap(pcm[i:i + frame_bytes], 2)  # L16 is big-endian; this assumes a little-endian host
        wide = history + audioop.mul(audioop.lin2lin(native, 2, 4), 4, 0.25)
        count = len(native) // 2
        first = phase
        out_count = len(range(first, count, 2))
        phase = (first - count) % 2
        acc = bytes(4 * out_count)
        for k, h in enumerate(taps):
            start = 64 + first - k
            column = memoryview(wide).cast("i")[start:start + 2 * out_count:2].tobytes()
            acc = audioop.add(acc, audioop.mul(column, 4, h), 4)
        history = wide[len(wide) - 4 * 64:]
        out.append(audioop.lin2ulaw(audioop.lin2lin(audioop.mul(acc, 4, 4.0), 4, 2), 2))
    return b"".join(out)


def new_uplink(pcm: bytes, frame_bytes: int) -> bytes:
    """The current :class:`UplinkDecoder` for L16 (big-endian) 16 kHz."""
    decoder = UplinkDecoder.for_format("L16", 16000)
    return b"".join(decoder.to_mulaw_8k(pcm[i:i + frame_bytes]) for i in range(0, len(pcm), frame_bytes))


# -- signals and measurements ---------------------------------------------------------------------------------

def pcm16(samples: NDArray[np.float64], order: str = "<") -> bytes:
    """Round and saturate to 16-bit PCM bytes."""
    return np.clip(np.rint(samples), -32768, 32767).astype(f"{order}i2").tobytes()


def decode(mulaw: bytes) -> NDArray[np.float64]:
    """μ-law bytes to float samples."""
    return np.frombuffer(audioop.ulaw2lin(mulaw, 2), dtype=np.int16).astype(np.float64)


def ulaw_steps(mulaw: bytes) -> NDArray[np.int64]:
    """μ-law bytes as signed quantiser step numbers (adjacent levels differ by 1; +0 and -0 are both 0)."""
    codes = np.frombuffer(mulaw, dtype=np.uint8).astype(np.int64)
    magnitude = 0x7F - (codes & 0x7F)  # G.711 stores the complement; bit 7 set means positive
    return np.where(codes & 0x80, magnitude, -magnitude)


def tones(rate: int, seconds: float, freqs: tuple[float, ...], amplitude: float,
          phases: tuple[float, ...] | None = None) -> NDArray[np.float64]:
    """A sum of sines, sampled from continuous time so every rate sees the same waveform."""
    t = np.arange(int(rate * seconds)) / rate
    phases = phases or (0.0,) * len(freqs)
    return sum((amplitude * np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases)), np.zeros(len(t)))


def steady(y: NDArray[np.float64], n: int = 8000, skip: int = 400) -> NDArray[np.float64]:
    """``n`` output samples after the first ``skip`` (past the filter's start-up)."""
    assert len(y) >= skip + n, (len(y), skip + n)
    return y[skip:skip + n]


def alias_db(convert: Converter, rate: int, freq: float) -> float:
    """Energy at 8 kHz of an input tone at ``freq`` (≥ 4 kHz: all of it is aliasing), dB re the tone's energy."""
    amplitude = 16384.0
    y = steady(decode(convert(pcm16(tones(rate, 1.2, (freq,), amplitude)), rate, rate * 2 * FRAME_MS // 1000)))
    spectrum = np.fft.rfft(y) / len(y)
    energy = float(np.sum(np.abs(spectrum[1:-1]) ** 2) * 2 + abs(spectrum[0]) ** 2 + abs(spectrum[-1]) ** 2)
    return 10 * math.log10(max(energy, 1e-12) / (amplitude ** 2 / 2))


def band_db(convert: Converter, rate: int, freq: int) -> float:
    """Gain at ``freq`` (an FFT bin of a 1 s window: no leakage), dB."""
    amplitude = 16384.0
    y = steady(decode(convert(pcm16(tones(rate, 1.2, (freq,), amplitude)), rate, rate * 2 * FRAME_MS // 1000)))
    return 20 * math.log10(2 * abs(np.fft.rfft(y)[freq]) / len(y) / amplitude)


def group_delay_ms(convert: Converter, rate: int) -> float:
    """Signal delay of the output against the input, from the phase slope over 500–3000 Hz, in ms.

    Tones are 1 s FFT bins 250 Hz apart (unambiguous up to 4 ms of delay); random phases keep the crest factor
    low. Positive: the output lags the input.
    """
    freqs = tuple(range(500, 3001, 250))
    phases = tuple(np.random.default_rng(7).uniform(0, 2 * np.pi, len(freqs)))
    x = tones(rate, 1.2, freqs, 2500.0, phases)
    y = steady(decode(convert(pcm16(x), rate, rate * 2 * FRAME_MS // 1000)))
    ref = steady(x[:: rate // 8000])  # the input at the output's sample instants
    shift = np.angle(np.fft.rfft(y)[list(freqs)] / np.fft.rfft(ref)[list(freqs)])
    slope = np.polyfit(2 * np.pi * np.array(freqs), np.unwrap(shift), 1)[0]
    return float(-slope * 1000)


def held_back_ms(rate: int) -> float:
    """The most audio :class:`DownlinkTranscoder` holds back while streaming 20 ms chunks, in ms."""
    transcoder, frame = DownlinkTranscoder(), rate * FRAME_MS // 1000
    x = pcm16(tones(rate, 0.5, (440.0,), 8000.0))
    fed = emitted = worst = 0
    for i in range(0, len(x), 2 * frame):
        emitted += len(transcoder.to_mulaw_8k(x[i:i + 2 * frame], "pcm16", rate))
        fed += frame
        worst = max(worst, fed * 8000 // rate - emitted)
    return worst / 8


def before_held_back_ms(rate: int) -> float:
    """The same for the former ``audioop.ratecv`` path."""
    state: RatecvState = None
    frame, x = rate * FRAME_MS // 1000, pcm16(tones(rate, 0.5, (440.0,), 8000.0))
    fed = emitted = worst = 0
    for i in range(0, len(x), 2 * frame):
        out, state = audioop.ratecv(x[i:i + 2 * frame], 2, 1, rate, 8000, state, 1, 1)
        emitted += len(out) // 2
        fed += frame
        worst = max(worst, fed * 8000 // rate - emitted)
    return worst / 8


def us_per_frame(run: Callable[[], object], frames: int, number: int = 10) -> float:
    """CPU µs per 20 ms frame: ``run`` converts ``frames`` frames; the best of 7 rounds of ``number`` runs.

    Process CPU time, not wall-clock, so other processes on a shared machine do not count; the minimum is the
    round least disturbed by cache and frequency effects (timeit's method).
    """
    run()  # warm-up: first-call allocations and caches
    best = min(timeit.repeat(run, number=number, repeat=7, timer=time.process_time))
    return best / number / frames * 1e6


# -- speech ----------------------------------------------------------------------------------------------------

def espeak_speech(rate: int) -> NDArray[np.float64] | None:
    """English speech from espeak-ng (22.05 kHz), resampled to ``rate`` by soxr VHQ or sox; None if unavailable."""
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), SPEECH_TEXT], check=True, capture_output=True)
        with wave.open(str(path)) as wav:
            native, source = wav.getframerate(), wav.readframes(wav.getnframes())
        samples = np.frombuffer(source, dtype="<i2").astype(np.float64)
        try:
            import soxr
        except ImportError:
            soxr = None
        if soxr is not None:
            out = soxr.resample(samples, native, rate, quality="VHQ")
        elif shutil.which("sox"):
            resampled = Path(tmp) / "out.raw"
            subprocess.run(["sox", str(path), "-r", str(rate), "-t", "raw", "-e", "signed", "-b", "16", "-L",
                            str(resampled)], check=True)
            out = np.frombuffer(resampled.read_bytes(), dtype="<i2").astype(np.float64)
        else:
            return None
    # Loudness like a call: peaks at about -3 dBFS.
    return out * (23000.0 / max(float(np.max(np.abs(out))), 1.0))


def synthetic_speech(rate: int, seconds: float = 6.0) -> NDArray[np.float64]:
    """A speech-like stand-in: voiced syllables (120–160 Hz pitch, harmonics to Nyquist, formant-ish tilt) and
    fricative noise bursts with energy from 4 kHz up, which is what aliases in a poor decimator."""
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * 140.0 * t - (20.0 / 0.7) * np.cos(2 * np.pi * 0.7 * t)
    voiced = sum((np.sin(k * phase) / k ** 1.2 for k in range(1, int(rate / 2 / 160))), np.zeros(len(t)))
    syllable = np.sin(np.pi * ((t * 4.0) % 1.0)) ** 2
    noise = np.random.default_rng(3).standard_normal(len(t))
    hiss = np.convolve(noise, [1.0, -1.0], "same")  # a first difference: a rising, fricative-like spectrum
    fricative = ((t * 4.0) % 1.0 > 0.75) * ((t % 2.0) < 1.5)
    x = 6000 * voiced * syllable * ((t % 2.0) < 1.5) + 2500 * hiss * fricative
    return x * (23000.0 / float(np.max(np.abs(x))))


def speech_scores(speech: NDArray[np.float64], rate: int) -> dict[str, tuple[float, float]] | None:
    """PESQ NB and STOI against a soxr VHQ 8 kHz reference, for μ-law of the reference, before and now."""
    try:
        import soxr
        from pesq import pesq
        from pystoi import stoi
    except ImportError:
        return None
    reference = np.clip(np.rint(soxr.resample(speech, rate, 8000, quality="VHQ")), -32768, 32767)
    source = pcm16(speech)
    chunk = rate * 2 * FRAME_MS // 1000
    outputs = {"μ-law of the reference (ceiling)": decode(audioop.lin2ulaw(reference.astype(np.int16).tobytes(), 2)),
               "before (ratecv)": decode(before(source, rate, chunk)),
               "now (FIR)": decode(now(source, rate, chunk))}
    scores = {}
    for name, degraded in outputs.items():
        n = min(len(reference), len(degraded))
        ref, deg = reference[:n] / 32768.0, degraded[:n] / 32768.0
        scores[name] = (float(pesq(8000, ref, deg, "nb")), float(stoi(ref, deg, 8000, extended=False)))
    return scores


# -- report ----------------------------------------------------------------------------------------------------

def report_downlink(rate: int, speech: NDArray[np.float64], speech_name: str) -> None:
    """Print every figure for one return-audio input rate."""
    print(f"\n== return audio pcm16 {rate} Hz -> μ-law 8 kHz ==")
    nyquist_tones = [f for f in ALIAS_TONES_HZ if f < rate / 2]
    for name, convert in (("before", before), ("now", now)):
        figures = {f: alias_db(convert, rate, f) for f in nyquist_tones}
        worst = max(figures, key=figures.__getitem__)
        some = ", ".join(f"{f / 1000:g}k {max(figures[f], -120):.1f}" for f in nyquist_tones[::4])
        print(f"  aliasing {name:6}: worst {figures[worst]:6.1f} dB (tone {worst} Hz); {some}")
    for name, convert in (("before", before), ("now", now)):
        band = ", ".join(f"{f} Hz {band_db(convert, rate, f):+.2f}" for f in BAND_TONES_HZ)
        print(f"  band     {name:6}: {band} dB")
    print(f"  delay    before: signal {group_delay_ms(before, rate):+.3f} ms, held back while streaming "
          f"{before_held_back_ms(rate):.3f} ms")
    print(f"  delay    now   : signal {group_delay_ms(now, rate):+.3f} ms, held back while streaming "
          f"{held_back_ms(rate):.3f} ms (the FIR's group delay)")
    one_second = pcm16(speech[:rate])
    frame = rate * 2 * FRAME_MS // 1000
    cpu_before = us_per_frame(lambda: before(one_second, rate, frame), 50)
    cpu_now = us_per_frame(lambda: now(one_second, rate, frame), 50)
    print(f"  CPU per 20 ms frame: before {cpu_before:.1f} µs, now {cpu_now:.1f} µs (incl. μ-law encoding)")
    report_soxr_streaming(rate, speech)
    scores = speech_scores(speech, rate)
    if scores is None:
        print("  PESQ/STOI: not measured (pip install -e '.[audio-quality]')")
        return
    for name, (pesq_nb, stoi_value) in scores.items():
        print(f"  {speech_name}: PESQ NB {pesq_nb:.3f}  STOI {stoi_value:.4f}  {name}")


def report_soxr_streaming(rate: int, speech: NDArray[np.float64]) -> None:
    """Why the relay does not stream through soxr: latency and chunk dependence of ``soxr.ResampleStream``."""
    try:
        import soxr
    except ImportError:
        print("  soxr ResampleStream: not measured (pip install -e '.[audio-quality]')")
        return
    frame = rate * FRAME_MS // 1000
    cuts = np.sort(np.random.default_rng(11).integers(0, len(speech), 60))
    for quality in ("HQ", "VHQ"):
        for dtype in ("int16", "float32"):
            x = np.clip(np.rint(speech), -32768, 32767).astype(dtype)

            def stream(bounds: list[int]) -> tuple[NDArray[np.float64], float]:
                resampler = soxr.ResampleStream(rate, 8000, 1, dtype=dtype, quality=quality)
                pieces, fed, emitted, worst = [], 0, 0, 0
                for start, end in zip(bounds[:-1], bounds[1:]):
                    pieces.append(resampler.resample_chunk(x[start:end]))
                    fed, emitted = end, emitted + len(pieces[-1])
                    worst = max(worst, fed * 8000 // rate - emitted)
                pieces.append(resampler.resample_chunk(x[:0], last=True))
                return np.concatenate(pieces).astype(np.float64), worst / 8

            _, held_ms = stream(list(range(0, len(x), frame)) + [len(x)])
            split, _ = stream([0, *cuts.tolist(), len(x)])
            whole, _ = stream([0, len(x)])
            same = len(split) == len(whole) and bool(np.array_equal(split, whole))
            differ = "identical" if same else f"differs by up to {np.max(np.abs(split - whole)):g}"
            print(f"  soxr ResampleStream {quality:3} {dtype:7}: holds back up to {held_ms:5.1f} ms in 20 ms "
                  f"chunks; random chunking vs one shot: {differ}")


def report_uplink() -> None:
    """Print the uplink L16 16 kHz decimator's cost and its difference from the former implementation."""
    print("\n== uplink L16 16 kHz -> μ-law 8 kHz (65-tap Hamming) ==")
    rng = np.random.default_rng(5)
    speechlike = synthetic_speech(16000, 2.0) * 0.5 + rng.standard_normal(32000) * 300
    payload = pcm16(speechlike, ">")
    old, new = old_uplink_decimate(payload, 640), new_uplink(payload, 640)
    codes = [ulaw_steps(old), ulaw_steps(new)]
    print(f"  output length before {len(old)} now {len(new)}; μ-law code difference: max "
          f"{int(np.max(np.abs(codes[0] - codes[1])))}, {int(np.count_nonzero(codes[0] != codes[1]))} of "
          f"{len(new)} samples differ")
    one_second = payload[:32000]
    cpu_before = us_per_frame(lambda: old_uplink_decimate(one_second, 640), 50, number=2)
    cpu_now = us_per_frame(lambda: new_uplink(one_second, 640), 50)
    print(f"  CPU per 20 ms frame: before {cpu_before:.1f} µs, now {cpu_now:.1f} µs (incl. μ-law encoding)")


def main(argv: list[str] | None = None) -> None:
    """Print the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic speech-like signal")
    args = parser.parse_args(argv)
    for rate in (16000, 24000):
        speech = None if args.synthetic else espeak_speech(rate)
        name = "espeak-ng speech" if speech is not None else "synthetic speech"
        report_downlink(rate, speech if speech is not None else synthetic_speech(rate), name)
    report_uplink()


if __name__ == "__main__":
    main()
