// The agent page's audio arithmetic, shared by its AudioWorklet and its main script, and tested under node
// (tests/test_agent_audio_js.py): G.711 μ-law exactly as Python's audioop (the relay's codec), a low-pass
// downsampler from the sound card's rate to 8 kHz, and the playback jitter buffer.

export const RATE = 8000;
export const FRAME_SAMPLES = 160; // 20 ms at 8 kHz: one frame on /agent/media
export const MULAW_SILENCE = 0xff;

const SEG_END = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];

// One 16-bit sample to μ-law: Sun's g711.c (14-bit magnitude, bias 33, clip 8159), which audioop.lin2ulaw uses.
export function linearToMulaw(sample) {
  let pcm = sample >> 2;
  let mask = 0xff;
  if (pcm < 0) { pcm = -pcm; mask = 0x7f; }
  if (pcm > 8159) pcm = 8159;
  pcm += 0x21;
  let seg = 0;
  while (seg < 8 && pcm > SEG_END[seg]) seg++;
  if (seg >= 8) return 0x7f ^ mask;
  return ((seg << 4) | ((pcm >> (seg + 1)) & 0x0f)) ^ mask;
}

// One μ-law byte to a 16-bit sample (audioop.ulaw2lin).
export function mulawToLinear(byte) {
  const u = ~byte & 0xff;
  let t = ((u & 0x0f) << 3) + 0x84;
  t <<= (u & 0x70) >> 4;
  return (u & 0x80) ? 0x84 - t : t - 0x84;
}

// A float sample (-1…1) as a 16-bit integer, rounded and clipped.
export function floatToInt16(x) {
  const v = Math.round(x * 32768);
  return v > 32767 ? 32767 : v < -32768 ? -32768 : v;
}

export function encodeMulaw(floats) {
  const out = new Uint8Array(floats.length);
  for (let i = 0; i < floats.length; i++) out[i] = linearToMulaw(floatToInt16(floats[i]));
  return out;
}

export function decodeMulaw(bytes) {
  const out = new Float32Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = mulawToLinear(bytes[i]) / 32768;
  return out;
}

// Windowed-sinc (Blackman) low-pass taps; cutoff as a fraction of the input rate.
export function lowPass(taps, cutoff) {
  const k = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const n = i - mid;
    const sinc = n === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * n) / (Math.PI * n);
    const w = 0.42 - 0.5 * Math.cos(2 * Math.PI * i / (taps - 1)) + 0.08 * Math.cos(4 * Math.PI * i / (taps - 1));
    k[i] = sinc * w;
    sum += k[i];
  }
  for (let i = 0; i < taps; i++) k[i] /= sum;
  return k;
}

// The microphone at the sound card's rate (44.1/48 kHz…) → 8 kHz: a 3.4 kHz low-pass, then linear
// interpolation at the fractional step; state carries across the worklet's 128-sample blocks.
export class Downsampler {
  constructor(inRate, outRate = RATE, taps = 63) {
    this.step = inRate / outRate;
    this.kernel = lowPass(taps, Math.min(3400, outRate * 0.425) / inRate);
    this.history = new Float32Array(taps * 2);
    this.at = 0;          // next write position in history (written twice, so a window is contiguous)
    this.index = 0;       // input samples seen
    this.next = 0;        // input position of the next output sample
    this.previous = 0;    // the filtered sample before the current one
  }

  push(input, out) {
    const taps = this.kernel.length;
    for (let i = 0; i < input.length; i++) {
      this.history[this.at] = this.history[this.at + taps] = input[i];
      this.at = (this.at + 1) % taps;
      let y = 0;
      for (let j = 0; j < taps; j++) y += this.kernel[j] * this.history[this.at + j];
      while (this.next <= this.index) {
        const frac = 1 - (this.index - this.next);
        out.push(this.previous + (y - this.previous) * frac);
        this.next += this.step;
      }
      this.previous = y;
      this.index++;
    }
    return out;
  }
}

// Kallglot's audio for the agent, 8 kHz, waiting to be played: playback starts once `targetSamples` are
// buffered (absorbing network jitter), restarts after an underrun the same way, drops the oldest audio beyond
// `maxSamples` (latency never grows without bound), and reports each mark when playback passes it.
// clear() drops everything at once (barge-in) and reports the marks still pending, as the carriers do.
export class JitterBuffer {
  constructor({ targetSamples = 480, maxSamples = 16000 } = {}) {
    this.targetSamples = targetSamples;
    this.buffer = new Float32Array(maxSamples);
    this.readAt = 0;
    this.count = 0;
    this.written = 0;     // samples ever queued
    this.played = 0;      // samples ever played
    this.playing = false;
    this.marks = [];      // { name, at: value of `written` when marked }
    this.underruns = 0;
    this.dropped = 0;
  }

  push(samples) {
    const cap = this.buffer.length;
    for (let i = 0; i < samples.length; i++) {
      if (this.count === cap) { // full: drop the oldest sample
        this.readAt = (this.readAt + 1) % cap;
        this.count--;
        this.played++;
        this.dropped++;
      }
      this.buffer[(this.readAt + this.count) % cap] = samples[i];
      this.count++;
      this.written++;
    }
  }

  // A mark at the end of what is queued; it also ends the utterance, so a short one plays without waiting.
  mark(name) {
    this.marks.push({ name, at: this.written });
    if (this.count > 0) this.playing = true;
  }

  // The next `n` samples to play (silence while priming or after an underrun); `onMark(name)` for passed marks.
  pull(n, onMark = () => {}) {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.shift(onMark);
    return out;
  }

  // The next sample to play (0 while priming or after an underrun).
  shift(onMark = () => {}) {
    if (!this.playing) {
      if (this.count >= this.targetSamples) this.playing = true;
      else { this.passMarks(onMark); return 0; }
    }
    if (this.count === 0) {
      this.playing = false;
      this.underruns++;
      return 0;
    }
    const sample = this.buffer[this.readAt];
    this.readAt = (this.readAt + 1) % this.buffer.length;
    this.count--;
    this.played++;
    this.passMarks(onMark);
    return sample;
  }

  passMarks(onMark) {
    while (this.marks.length && this.marks[0].at <= this.played) onMark(this.marks.shift().name);
  }

  clear() {
    const pending = this.marks.map((m) => m.name);
    this.played += this.count;
    this.readAt = (this.readAt + this.count) % this.buffer.length;
    this.count = 0;
    this.playing = false;
    this.marks = [];
    return pending;
  }

  get bufferedSamples() { return this.count; }
}
