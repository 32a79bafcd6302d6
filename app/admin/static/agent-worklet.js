// The agent page's two AudioWorklet processors. kb-capture: microphone (sound-card rate) → 8 kHz μ-law frames of
// 20 ms, posted to the page. kb-playback: Kallglot's 8 kHz audio through the jitter buffer to the speaker.
import { Downsampler, FRAME_SAMPLES, JitterBuffer, RATE, encodeMulaw } from "./agent-codec.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.downsampler = new Downsampler(sampleRate);
    this.pending = [];
    this.level = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      this.downsampler.push(channel, this.pending);
      let sum = 0;
      for (let i = 0; i < channel.length; i++) sum += channel[i] * channel[i];
      this.level = Math.max(Math.sqrt(sum / channel.length), this.level * 0.95);
    }
    while (this.pending.length >= FRAME_SAMPLES) {
      const frame = encodeMulaw(this.pending.splice(0, FRAME_SAMPLES));
      this.port.postMessage({ frame, level: this.level }, [frame.buffer]);
    }
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    // A 60 ms cushion against network jitter; room for a minute, as Kallglot may send speech faster than it plays.
    this.jitter = new JitterBuffer({ targetSamples: 480, maxSamples: RATE * 60 });
    this.ratio = RATE / sampleRate;  // 8 kHz samples per output sample
    this.phase = 0;
    this.a = 0;
    this.b = 0;
    this.port.onmessage = ({ data }) => {
      if (data.type === "audio") this.jitter.push(data.samples);
      else if (data.type === "mark") this.jitter.mark(data.name);
      else if (data.type === "clear") {
        for (const name of this.jitter.clear()) this.port.postMessage({ type: "mark", name });
        this.a = this.b = 0; // stop at once: nothing of the cleared audio plays
      }
    };
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const onMark = (name) => this.port.postMessage({ type: "mark", name });
    for (let i = 0; i < out.length; i++) {
      this.phase += this.ratio;
      while (this.phase >= 1) {
        this.phase -= 1;
        this.a = this.b;
        this.b = this.jitter.shift(onMark);
      }
      out[i] = this.a + (this.b - this.a) * this.phase;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    return true;
  }
}

registerProcessor("kb-capture", CaptureProcessor);
registerProcessor("kb-playback", PlaybackProcessor);
