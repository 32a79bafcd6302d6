"""The agent page's audio code (``app/admin/static/agent-codec.js``) run with node: its μ-law encoder and decoder
against the relay's Python codec (audioop) for every value, its downsampler's band, and its jitter buffer."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.relay.audio import audioop

CODEC = Path(__file__).resolve().parent.parent / "app" / "admin" / "static" / "agent-codec.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def run_js(body: str) -> Any:
    """Run ``body`` (an ES module that imports the codec as ``codec`` and prints one JSON value) under node."""
    script = f"import * as codec from {json.dumps(CODEC.as_uri())};\n{body}\n"
    done = subprocess.run([str(NODE), "--input-type=module", "-e", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_mulaw_encoder_matches_the_relays_codec_for_every_16_bit_sample() -> None:
    encoded = run_js("""
        const out = [];
        for (let s = -32768; s <= 32767; s++) out.push(codec.linearToMulaw(s));
        console.log(JSON.stringify(out));""")
    samples = b"".join(s.to_bytes(2, "little", signed=True) for s in range(-32768, 32768))
    assert bytes(encoded) == audioop.lin2ulaw(samples, 2)


def test_mulaw_decoder_matches_the_relays_codec_for_every_byte() -> None:
    decoded = run_js("console.log(JSON.stringify(Array.from({length: 256}, (_, b) => codec.mulawToLinear(b))));")
    expected = audioop.ulaw2lin(bytes(range(256)), 2)
    assert decoded == [int.from_bytes(expected[i:i + 2], "little", signed=True) for i in range(0, 512, 2)]


def test_float_frames_encode_as_the_python_codec_encodes_their_16_bit_samples() -> None:
    result = run_js("""
        const floats = Float32Array.from({length: 160}, (_, i) => 0.8 * Math.sin(i / 3) * (i % 7 ? 1 : -1.3));
        console.log(JSON.stringify({floats: Array.from(floats), mulaw: Array.from(codec.encodeMulaw(floats))}));""")
    pcm = b"".join(max(-32768, min(32767, round(x * 32768))).to_bytes(2, "little", signed=True)
                   for x in result["floats"])
    assert bytes(result["mulaw"]) == audioop.lin2ulaw(pcm, 2)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_downsampler_keeps_speech_band_and_removes_what_would_alias(rate: int) -> None:
    levels = run_js(f"""
        function level(freq) {{
          const d = new codec.Downsampler({rate});
          const out = [];
          for (let block = 0; block < {rate} / 128; block++) {{  // one second in worklet-sized blocks
            const input = Float32Array.from({{length: 128}}, (_, i) => Math.sin(2 * Math.PI * freq * (block * 128 + i) / {rate}));
            d.push(input, out);
          }}
          const tail = out.slice(2000);
          return {{n: out.length, seen: Math.ceil({rate} / 128) * 128, rms: Math.sqrt(tail.reduce((a, x) => a + x * x, 0) / tail.length)}};
        }}
        console.log(JSON.stringify({{low: level(1000), edge: level(3000), alias: level(6000), high: level(12000)}}));""")
    assert abs(levels["low"]["n"] - levels["low"]["seen"] * 8000 / rate) <= 1  # 8 kHz out, whatever the card's rate
    assert levels["low"]["rms"] == pytest.approx(1 / math.sqrt(2), rel=0.05)  # speech band passes
    assert levels["edge"]["rms"] > 0.5
    assert levels["alias"]["rms"] < 0.01 and levels["high"]["rms"] < 0.01  # would fold back into the band


def test_jitter_buffer_primes_plays_in_order_and_recovers_from_an_underrun() -> None:
    result = run_js("""
        const jb = new codec.JitterBuffer({targetSamples: 4, maxSamples: 100});
        const seen = [];
        jb.push(Float32Array.of(1, 2, 3));
        seen.push(Array.from(jb.pull(2)));         // priming: 3 < 4 buffered, silence
        jb.push(Float32Array.of(4, 5));
        seen.push(Array.from(jb.pull(6)));         // plays 1..5, then underruns
        jb.push(Float32Array.of(6, 7));
        seen.push(Array.from(jb.pull(2)));         // re-priming after the underrun: silence again
        jb.push(Float32Array.of(8, 9));
        seen.push(Array.from(jb.pull(4)));
        console.log(JSON.stringify({seen, underruns: jb.underruns}));""")
    assert result["seen"] == [[0, 0], [1, 2, 3, 4, 5, 0], [0, 0], [6, 7, 8, 9]]
    assert result["underruns"] == 1


def test_jitter_buffer_reports_marks_when_played_and_a_short_utterance_plays_at_its_mark() -> None:
    result = run_js("""
        const jb = new codec.JitterBuffer({targetSamples: 480, maxSamples: 1000});
        const marks = [];
        jb.push(Float32Array.of(0.5, 0.5, 0.5));   // shorter than the cushion...
        jb.mark("utt-1");                           // ...but the utterance is over: play it
        const first = Array.from(jb.pull(2, (n) => marks.push(n)));
        const beforeEnd = marks.length;
        jb.pull(2, (n) => marks.push(n));
        console.log(JSON.stringify({first, beforeEnd, marks}));""")
    assert result["first"] == [0.5, 0.5] and result["beforeEnd"] == 0 and result["marks"] == ["utt-1"]


def test_jitter_buffer_clear_stops_playback_at_once_and_returns_pending_marks() -> None:
    result = run_js("""
        const jb = new codec.JitterBuffer({targetSamples: 2, maxSamples: 100});
        jb.push(Float32Array.of(1, 1, 1, 1, 1, 1));
        jb.mark("utt-1");
        jb.pull(2);
        const pending = jb.clear();
        const after = Array.from(jb.pull(3));
        jb.push(Float32Array.of(2, 2));
        console.log(JSON.stringify({pending, after, next: Array.from(jb.pull(2)), buffered: jb.bufferedSamples}));""")
    assert result["pending"] == ["utt-1"]
    assert result["after"] == [0, 0, 0]  # nothing of the cleared audio plays
    assert result["next"] == [2, 2] and result["buffered"] == 0


def test_jitter_buffer_latency_is_capped_by_dropping_the_oldest_audio() -> None:
    result = run_js("""
        const jb = new codec.JitterBuffer({targetSamples: 1, maxSamples: 4});
        jb.push(Float32Array.of(1, 2, 3, 4, 5, 6));
        console.log(JSON.stringify({played: Array.from(jb.pull(4)), dropped: jb.dropped}));""")
    assert result == {"played": [3, 4, 5, 6], "dropped": 2}
