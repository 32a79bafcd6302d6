// The agent's call page: microphone → AudioWorklet (8 kHz μ-law, 20 ms) → WebSocket /agent/media → Kallglot,
// and Kallglot's audio → jitter buffer → speaker; mute, hang up, and the live transcript beside them.
// Nothing leaves the page except to this service. window.kbAgent exposes its state (the browser test reads it).
import { decodeMulaw, MULAW_SILENCE, FRAME_SAMPLES } from "./agent-codec.js";

const root = document.getElementById("agent-call");
const stateLabel = document.getElementById("call-state");
const muteButton = document.getElementById("mute");
const hangupButton = document.getElementById("hangup");
const micMeter = document.getElementById("mic-level");
const outMeter = document.getElementById("out-level");
const transcript = document.querySelector("#agent-transcript tbody");

const agent = {
  state: "connecting", framesSent: 0, framesReceived: 0, marksEchoed: 0, clears: 0, muted: false,
  analyser: null, closeCode: null,
  // RMS of what the speaker plays right now (the analyser node after the jitter buffer).
  level() {
    if (!this.analyser) return 0;
    const data = new Float32Array(this.analyser.fftSize);
    this.analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const x of data) sum += x * x;
    return Math.sqrt(sum / data.length);
  },
  peakLevel: 0,
};
window.kbAgent = agent;

function setState(state, text) {
  agent.state = state;
  stateLabel.textContent = text || state;
}

function base64(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}

function unbase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function send(ws, message) {
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function showLine(event) {
  // A line with an id replaces its earlier copy (partials, and the same final relayed by both legs' streams);
  // without one, a speaker's final replaces that speaker's open partial.
  const slot = event.item || event.speaker || "";
  let row = transcript.querySelector(`tr${event.item ? "" : ".partial"}[data-slot="${CSS.escape(slot)}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.slot = slot;
    for (let i = 0; i < 3; i++) row.appendChild(document.createElement(i ? "td" : "th"));
    transcript.appendChild(row);
    while (transcript.rows.length > 200) transcript.deleteRow(0);
  }
  row.className = event.final ? "final" : "partial";
  row.cells[0].textContent = event.speaker || "";
  row.cells[0].className = `speaker speaker-${event.speaker || ""}`;
  row.cells[1].textContent = event.text || "";
  row.cells[2].textContent = event.translation || "";
}

function followTranscript() {
  const source = new EventSource(root.dataset.events);
  source.addEventListener("transcript", (e) => showLine(JSON.parse(e.data)));
  source.addEventListener("session", (e) => {
    if (JSON.parse(e.data).state === "ended") source.close();
  });
  return source;
}

async function start() {
  const context = new AudioContext();
  await context.audioWorklet.addModule(root.dataset.worklet);
  const microphone = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
  });
  const capture = new AudioWorkletNode(context, "kb-capture", { numberOfOutputs: 1 });
  const sink = context.createGain();
  sink.gain.value = 0; // the capture node must be pulled by the graph; nothing of the microphone is heard
  context.createMediaStreamSource(microphone).connect(capture).connect(sink).connect(context.destination);
  const playback = new AudioWorkletNode(context, "kb-playback", { numberOfInputs: 0, outputChannelCount: [1] });
  agent.analyser = context.createAnalyser();
  agent.analyser.fftSize = 1024;
  playback.connect(agent.analyser).connect(context.destination);
  if (context.state !== "running") {
    const note = document.getElementById("audio-note");
    note.hidden = false;
    document.getElementById("enable-audio").addEventListener("click", () => {
      context.resume();
      note.hidden = true;
    });
  }

  const url = new URL(root.dataset.media, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.onopen = () => {
    send(ws, { event: "start", leg: root.dataset.leg, token: root.dataset.token });
    setState("on call", "on the call");
  };
  ws.onmessage = ({ data }) => {
    const message = JSON.parse(data);
    if (message.event === "media") {
      agent.framesReceived++;
      playback.port.postMessage({ type: "audio", samples: decodeMulaw(unbase64(message.payload)) });
    } else if (message.event === "mark") {
      playback.port.postMessage({ type: "mark", name: message.name });
    } else if (message.event === "clear") {
      agent.clears++;
      playback.port.postMessage({ type: "clear" });
    }
  };
  ws.onclose = (e) => {
    agent.closeCode = e.code;
    microphone.getTracks().forEach((t) => t.stop());
    setTimeout(() => context.close(), 200);
    if (agent.state !== "hung up") setState("ended", e.code === 1000 ? "off the call (the call ended)" : `disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`);
  };
  playback.port.onmessage = ({ data }) => {
    if (data.type === "mark") {
      agent.marksEchoed++;
      send(ws, { event: "mark", name: data.name });
    }
  };
  const silence = new Uint8Array(FRAME_SAMPLES).fill(MULAW_SILENCE);
  capture.port.onmessage = ({ data }) => {
    // Muted: silence keeps the stream's timing; nothing of the microphone leaves the page.
    send(ws, { event: "media", payload: base64(agent.muted ? silence : data.frame) });
    agent.framesSent++;
    micMeter.value = agent.muted ? 0 : Math.min(1, data.level * 4);
  };
  setInterval(() => {
    const level = agent.level();
    agent.peakLevel = Math.max(agent.peakLevel, level);
    outMeter.value = Math.min(1, level * 4);
  }, 100);

  muteButton.addEventListener("click", () => {
    agent.muted = !agent.muted;
    muteButton.setAttribute("aria-pressed", String(agent.muted));
    muteButton.textContent = agent.muted ? "Unmute" : "Mute";
  });
  hangupButton.addEventListener("click", () => {
    setState("hung up", "off the call (you hung up)");
    send(ws, { event: "hangup" });
    hangupButton.disabled = muteButton.disabled = true;
  });
}

if (root) {
  followTranscript();
  // No microphone (refused, none plugged in): say so; "Give the call back" puts it back on the waiting list.
  start().catch((error) => {
    setState("failed", `not connected: ${error.message || error}`);
    document.getElementById("give-back").classList.add("prominent");
  });
}
