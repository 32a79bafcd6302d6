// Load generator for `python -m app.devtools.loadtest` (which starts it, pinned to its own core, once per step).
//
// Places N simulated inbound Twilio calls against the bridge exactly as Twilio would: a signed POST to
// /twilio/voice, then the <Connect><Stream> media WebSocket (signed upgrade, connected/start/media/stop frames),
// 20 ms μ-law frames at 50 frames/s per call, real-time paced with random phases so frames do not arrive in
// bursts. Every frame's first bytes carry its number; the emulator echoes each 100 ms audio.input, the relay
// plays it back as one media frame, and the frame number of the chunk's last frame gives the end-to-end
// time (last frame of a chunk sent → its echo received). K probe connections talk to the emulator's stream
// socket directly at the same time, which measures the emulator's own echo time (plus one loopback hop).
//
// Input: one JSON argument (see app/devtools/loadtest/__main__.py). Output: "STEADY_START", "STEADY_END", then one
// line "RESULT {json}". Bounded: every phase has a deadline, and the process exits by itself.
import crypto from 'node:crypto';
import http from 'node:http';
import { WebSocket } from 'ws';

const cfg = JSON.parse(process.argv[2]);
const FRAME_BYTES = 160;
const FRAME_MS = 20;
const FRAMES_PER_CHUNK = cfg.chunkMs / FRAME_MS;
const RING = 8192; // send times kept per call (164 s of frames)
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
const now = () => performance.now();

function twilioSignature(url, params) {
  const data = url + Object.keys(params).sort().map((k) => k + params[k]).join('');
  return crypto.createHmac('sha1', cfg.authToken).update(data).digest('base64');
}

function request(method, url, { body = null, headers = {} } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, agent, headers, timeout: 15000 }, (res) => {
      const parts = [];
      res.on('data', (d) => parts.push(d));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(parts).toString() }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

function percentiles(values) {
  if (!values.length) return null;
  const sorted = Float64Array.from(values).sort();
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { n: sorted.length, p50: at(0.5), p95: at(0.95), p99: at(0.99), max: sorted[sorted.length - 1] };
}

const stats = {
  voiceMs: [], e2eMs: [], probeMs: [], errors: {}, framesSent: 0, framesEchoed: 0, lateTicks: 0, maxLagMs: 0,
  callsConnected: 0, callsClosedEarly: 0,
};
let measuring = false;
const error = (kind) => { stats.errors[kind] = (stats.errors[kind] || 0) + 1; };

class Call {
  constructor(index) {
    this.index = index;
    this.callSid = 'CA' + crypto.randomBytes(16).toString('hex');
    this.streamSid = 'MZ' + crypto.randomBytes(16).toString('hex');
    this.sent = 0;
    this.echoed = 0;
    this.sendTimes = new Float64Array(RING);
    this.open = false;
    this.sending = false;
    this.seq = 0;
    this.frame = Buffer.alloc(FRAME_BYTES, 0xff);
  }

  async place() {
    const url = cfg.baseUrl + '/twilio/voice';
    const params = { CallSid: this.callSid, AccountSid: cfg.accountSid, From: '+1555' + String(1000000 + this.index),
      To: cfg.to, CallStatus: 'ringing', Direction: 'inbound', ApiVersion: '2010-04-01' };
    const body = new URLSearchParams(params).toString();
    const started = now();
    const res = await request('POST', url, { body, headers: {
      'Content-Type': 'application/x-www-form-urlencoded', 'Content-Length': Buffer.byteLength(body),
      'X-Twilio-Signature': twilioSignature(url, params) } });
    stats.voiceMs.push(now() - started);
    if (res.status !== 200) throw new Error('voice HTTP ' + res.status);
    const streamUrl = /<Stream[^>]*url="([^"]+)"/.exec(res.body)?.[1];
    const custom = {};
    for (const m of res.body.matchAll(/<Parameter name="([^"]+)" value="([^"]*)"/g)) custom[m[1]] = m[2];
    if (!streamUrl) throw new Error('no <Stream> in TwiML');
    await this.connect(streamUrl.replace(/&amp;/g, '&'), custom);
  }

  connect(url, custom) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { headers: { 'X-Twilio-Signature': twilioSignature(url, {}) },
        perMessageDeflate: false, handshakeTimeout: 10000 });
      this.ws = ws;
      ws.on('open', () => {
        this.open = true;
        stats.callsConnected += 1;
        this.send({ event: 'connected', protocol: 'Call', version: '1.0.0' });
        this.send({ event: 'start', sequenceNumber: String(++this.seq), streamSid: this.streamSid, start: {
          accountSid: cfg.accountSid, streamSid: this.streamSid, callSid: this.callSid, tracks: ['inbound'],
          customParameters: custom, mediaFormat: { encoding: 'audio/x-mulaw', sampleRate: 8000, channels: 1 } } });
        this.nextDue = now() + Math.random() * FRAME_MS;
        this.sending = true;
        resolve();
      });
      ws.on('message', (data) => this.onMessage(data));
      ws.on('close', () => {
        if (this.open && this.sending) stats.callsClosedEarly += 1;
        this.open = false;
        this.sending = false;
      });
      ws.on('error', (e) => { error('ws: ' + e.message.slice(0, 60)); reject(e); });
    });
  }

  send(message) { this.ws.send(JSON.stringify(message)); }

  sendFrame(at) {
    this.frame.writeUInt32BE(this.sent, 0);
    this.sendTimes[this.sent % RING] = at;
    this.sent += 1;
    this.seq += 1;
    this.ws.send('{"event":"media","sequenceNumber":"' + this.seq + '","media":{"track":"inbound","chunk":"' +
      this.sent + '","timestamp":"' + this.sent * FRAME_MS + '","payload":"' + this.frame.toString('base64') +
      '"},"streamSid":"' + this.streamSid + '"}');
  }

  onMessage(data) {
    const message = JSON.parse(data.toString());
    if (message.event !== 'media') return;
    const payload = Buffer.from(message.media.payload, 'base64');
    const frames = Math.floor(payload.length / FRAME_BYTES);
    this.echoed += frames;
    if (measuring && frames > 0) {
      const last = payload.readUInt32BE((frames - 1) * FRAME_BYTES);
      stats.e2eMs.push(now() - this.sendTimes[last % RING]);
    }
  }

  hangUp() {
    if (!this.open) return;
    this.sending = false;
    this.send({ event: 'stop', sequenceNumber: String(++this.seq), streamSid: this.streamSid,
      stop: { accountSid: cfg.accountSid, callSid: this.callSid } });
    this.ws.close(1000);
  }
}

class Probe {
  // A direct connection to the emulator's stream socket: its echo time, without the relay.
  async open() {
    const res = await request('POST', cfg.emulatorUrl + '/v1/sessions', {
      body: JSON.stringify({ mode: 'bidirectional_translation' }),
      headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + cfg.emulatorApiKey,
        'Idempotency-Key': 'probe-' + crypto.randomBytes(8).toString('hex') } });
    const session = JSON.parse(res.body);
    this.sent = 0;
    this.times = new Float64Array(RING);
    await new Promise((resolve, reject) => {
      this.ws = new WebSocket(session.stream.url + '?token=' + encodeURIComponent(session.stream.token),
        { perMessageDeflate: false });
      this.ws.on('open', resolve);
      this.ws.on('error', reject);
      this.ws.on('message', (data) => {
        const message = JSON.parse(data.toString());
        if (message.type !== 'audio.output' || !measuring) return;
        const payload = Buffer.from(message.audio.payload, 'base64');
        stats.probeMs.push(now() - this.times[payload.readUInt32BE(0) % RING]);
      });
    });
    this.chunk = Buffer.alloc(FRAME_BYTES * FRAMES_PER_CHUNK, 0xff);
    this.nextDue = now() + Math.random() * cfg.chunkMs;
  }

  tick(at) {
    if (at < this.nextDue || this.ws.readyState !== WebSocket.OPEN) return;
    this.nextDue += cfg.chunkMs;
    this.chunk.writeUInt32BE(this.sent, 0);
    this.times[this.sent % RING] = at;
    this.sent += 1;
    this.ws.send(JSON.stringify({ type: 'audio.input', sequence: this.sent, timestamp_ms: this.sent * cfg.chunkMs,
      speaker: 'customer', audio: { encoding: 'mulaw', sample_rate_hz: 8000, payload: this.chunk.toString('base64') } }));
  }

  close() { this.ws.close(1000); }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const calls = Array.from({ length: cfg.calls }, (_, i) => new Call(i));
  const probes = Array.from({ length: cfg.probes }, () => new Probe());
  await Promise.all(probes.map((p) => p.open()));

  // One pacing loop for every call: each call's frames are due every 20 ms from its own random phase.
  const pacer = setInterval(() => {
    const at = now();
    for (const call of calls) {
      if (!call.sending) continue;
      let burst = 0;
      while (call.nextDue <= at && burst < 3 && !(call.sent >= call.targetFrames)) {
        const lag = at - call.nextDue;
        if (lag > stats.maxLagMs && measuring) stats.maxLagMs = lag;
        call.sendFrame(at);
        call.nextDue += FRAME_MS;
        burst += 1;
      }
      if (call.nextDue <= at) { // more than 3 frames behind: the generator itself is saturated
        if (measuring) stats.lateTicks += 1;
        call.nextDue = at + FRAME_MS;
      }
    }
    for (const probe of probes) probe.tick(at);
  }, 2);

  // Ramp: calls are placed at cfg.rate per second; a call that fails to set up is counted, not retried.
  const rampStart = now();
  const placing = calls.map(async (call, i) => {
    await sleep(Math.max(0, rampStart + (i * 1000) / cfg.rate - now()));
    try { await call.place(); } catch (e) { error('setup: ' + String(e.message).slice(0, 60)); }
  });
  await Promise.race([Promise.all(placing), sleep(cfg.calls / cfg.rate * 1000 + 30000)]);
  const voiceMs = stats.voiceMs.slice();
  await sleep(cfg.settleSeconds * 1000); // let the relays and Kallglot streams settle

  const sentAtStart = calls.reduce((n, c) => n + c.sent, 0);
  measuring = true;
  console.log('STEADY_START');
  const steadyStart = now();
  await sleep(cfg.steadySeconds * 1000);
  const steadySeconds = (now() - steadyStart) / 1000;
  console.log('STEADY_END');
  measuring = false;
  const sentInSteady = calls.reduce((n, c) => n + c.sent, 0) - sentAtStart;

  // Stop sending on a chunk boundary, wait for the last echoes, then count what never came back.
  for (const call of calls) {
    call.targetFrames = Math.ceil(call.sent / FRAMES_PER_CHUNK) * FRAMES_PER_CHUNK;
  }
  const finishDeadline = now() + 2000;
  while (now() < finishDeadline && calls.some((c) => c.sending && c.sent < c.targetFrames)) await sleep(5);
  for (const call of calls) call.sending = false;
  const echoDeadline = now() + 3000;
  while (now() < echoDeadline && calls.some((c) => c.open && c.echoed < c.sent)) await sleep(20);
  clearInterval(pacer);
  const held = calls.filter((c) => c.open).length;
  let framesSent = 0; let framesEchoed = 0;
  for (const call of calls) {
    if (call.sent === 0) continue;
    framesSent += call.sent;
    framesEchoed += call.echoed;
  }
  for (const call of calls) call.hangUp();
  for (const probe of probes) probe.close();
  await sleep(1500);

  const result = {
    calls: cfg.calls, held, connected: stats.callsConnected, closedEarly: stats.callsClosedEarly,
    steadySeconds, framesSentInSteady: sentInSteady, framesSent, framesEchoed, framesLost: framesSent - framesEchoed,
    voiceMs: percentiles(voiceMs), e2eMs: percentiles(stats.e2eMs), probeMs: percentiles(stats.probeMs),
    generatorLateTicks: stats.lateTicks, generatorMaxLagMs: stats.maxLagMs, errors: stats.errors,
  };
  console.log('RESULT ' + JSON.stringify(result));
  agent.destroy();
  process.exit(0);
}

setTimeout(() => { console.log('RESULT ' + JSON.stringify({ error: 'generator deadline' })); process.exit(2); },
  (cfg.calls / cfg.rate + cfg.settleSeconds + cfg.steadySeconds + 60) * 1000).unref();
main().catch((e) => { console.log('RESULT ' + JSON.stringify({ error: String(e) })); process.exit(1); });
