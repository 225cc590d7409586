// The softphone: the browser as a phone line into the bridge. The microphone goes up as
// Twilio's 20 ms mu-law frames; the bot's audio plays through a worklet whose clock
// decides when each mark is echoed, so barge-in and "what the caller heard" work as on a
// phone. The transcript comes from the call's event stream.
import { api, ApiError, askToken, events, token } from "./api.js";
import { base64ToBytes, decode } from "./g711.js";
import { MediaStreamLine } from "./stream.js";

const $ = (id) => document.getElementById(id);
const protectedMode = document.body.dataset.protected === "yes";

// What happened on the call, for people (the page) and for the browser tests.
const softphone = {
  state: "idle",
  callSid: "",
  framesSent: 0,
  audioReceivedMs: 0,
  marks: [], // {name, receivedAt, echoedAt, cleared}
  clears: [], // {at, droppedMs, marks}
  events: [], // the call's events, as received
  closeCode: null,
  closeReason: "",
};
window.softphone = softphone;

let call = null; // {ws, line, context, capture, playback, media, abort, started}

function setState(state, text) {
  softphone.state = state;
  const node = $("status");
  node.dataset.state = state;
  node.textContent = text;
  const live = state === "connecting" || state === "live";
  $("call").disabled = live;
  $("hangup").disabled = !live;
  $("mute").disabled = state !== "live";
  $("caller").disabled = live;
}

function line(kind, text) {
  const list = $("transcript");
  if (list.firstElementChild?.classList.contains("note")) list.replaceChildren();
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text;
  list.append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function showEvent(event) {
  softphone.events.push(event);
  const data = event.data;
  if (event.type === "transcript" && data.role === "user") {
    line("user", data.text);
  } else if (event.type === "transcript" && data.role === "assistant") {
    const heard = data.heard_text ?? data.text;
    const item = line("assistant", heard);
    if (data.interrupted && data.text.length > heard.length) {
      const cut = document.createElement("del");
      cut.textContent = data.text.slice(heard.length);
      cut.title = "not heard: you cut in";
      item.append(cut);
    }
  } else if (event.type === "barge_in") {
    line("event", `You cut in: the bot was stopped after ${data.heard_ms} ms of its reply`);
  } else if (event.type === "dtmf") {
    line("key", `You pressed ${data.digit}${data.action ? ` → ${data.action}` : ""}`);
  } else if (event.type === "control") {
    const where =
      data.action === "transfer"
        ? `Transferred to ${data.to} (a softphone cannot dial out: a phone caller would now be ringing there)`
        : "Hung up by the bridge";
    line("event", `${where} · by ${data.source}`);
  } else if (event.type === "call.ended") {
    line("event", `Call ended: ${data.outcome.replaceAll("_", " ")} after ${data.duration_s.toFixed(1)} s`);
  }
}

async function placeCall() {
  setState("connecting", "Calling…");
  softphone.marks = [];
  softphone.clears = [];
  softphone.events = [];
  softphone.framesSent = 0;
  softphone.audioReceivedMs = 0;
  softphone.closeCode = null;
  let placed;
  try {
    const response = await api("/phone/calls", { method: "POST", body: { from: $("caller").value } });
    placed = await response.json();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      token.clear();
      setState("idle", "Ready to call");
      await askToken($("token-form"), "The token was not accepted. The softphone needs the bridge's API token.");
      return placeCall();
    }
    setState("failed", `Could not place the call: ${error.message}`);
    return;
  }
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (error) {
    setState("failed", `No microphone: ${error.message}`);
    return;
  }
  const context = new AudioContext({ latencyHint: "interactive" });
  await context.audioWorklet.addModule("/ui/capture-worklet.js");
  await context.audioWorklet.addModule("/ui/playback-worklet.js");
  const capture = new AudioWorkletNode(context, "capture", { numberOfInputs: 1, numberOfOutputs: 0 });
  const playback = new AudioWorkletNode(context, "playback", {
    numberOfInputs: 0,
    numberOfOutputs: 1,
    outputChannelCount: [1],
  });
  playback.connect(context.destination);
  const lineProtocol = new MediaStreamLine(placed.call_sid, placed.parameters);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}${placed.stream_path}`);
  const abort = new AbortController();
  call = { ws, line: lineProtocol, context, capture, playback, media, abort, started: 0 };
  softphone.callSid = placed.call_sid;

  const send = (text) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(text);
  };
  const awaiting = new Map(); // mark name -> its entry in softphone.marks, until echoed
  const echo = (names) => {
    for (const name of names) {
      send(lineProtocol.mark(name));
      const mark = awaiting.get(name);
      awaiting.delete(name);
      if (mark) mark.echoedAt = performance.now();
    }
  };
  capture.port.onmessage = ({ data }) => {
    if (data.type === "frame") {
      send(lineProtocol.media(data.payload));
      softphone.framesSent += 1;
    } else if (data.type === "level") {
      $("mic-level").value = Math.min(1, data.rms * 4);
    }
  };
  playback.port.onmessage = ({ data }) => {
    if (data.type === "played") {
      // Played by the worklet; heard once the device has played it too.
      const outputMs = ((context.outputLatency || 0) + (context.baseLatency || 0)) * 1000;
      setTimeout(() => echo(data.names), outputMs);
    } else if (data.type === "cleared") {
      for (const name of data.names) {
        const mark = awaiting.get(name);
        if (mark) mark.cleared = true;
      }
      softphone.clears.push({ at: performance.now(), droppedMs: data.droppedSamples / 8, marks: data.names });
      echo(data.names); // as Twilio does: a clear returns the pending marks at once
    } else if (data.type === "level") {
      $("bot-level").value = Math.min(1, data.rms * 4);
    }
  };
  ws.onopen = () => {
    for (const text of lineProtocol.opening()) ws.send(text);
    context.createMediaStreamSource(media).connect(capture);
    call.started = performance.now();
    setState("live", "On the call");
  };
  ws.onmessage = ({ data }) => {
    const message = lineProtocol.read(data);
    if (message === null) return;
    if (message.event === "media") {
      const samples = decode(base64ToBytes(message.payload));
      softphone.audioReceivedMs += samples.length / 8;
      playback.port.postMessage({ type: "audio", samples }, [samples.buffer]);
    } else if (message.event === "mark") {
      const mark = { name: message.name, receivedAt: performance.now(), echoedAt: null, cleared: false };
      softphone.marks.push(mark);
      awaiting.set(message.name, mark);
      playback.port.postMessage({ type: "mark", name: message.name });
    } else {
      playback.port.postMessage({ type: "clear" });
    }
  };
  ws.onclose = (e) => {
    softphone.closeCode = e.code;
    softphone.closeReason = e.reason;
    const text = e.code === 1000 || e.code === 1005 ? "Call ended" : `Call ended (${e.code}${e.reason ? `: ${e.reason}` : ""})`;
    finish(softphone.state === "connecting" && e.code !== 1000 ? "failed" : "ended", text);
  };
  events(`/phone/calls/${placed.call_sid}/events`, (kind, data) => kind === "event" && showEvent(data), abort.signal).catch(
    (error) => {
      if (error.name !== "AbortError") line("event", `No live transcript: ${error.message}`);
    },
  );
}

function finish(state, text) {
  if (!call) return;
  const { media, context, abort } = call;
  call = null;
  media.getTracks().forEach((t) => t.stop());
  context.close();
  // The call's last events (call.ended) follow the close: let them arrive first.
  setTimeout(() => abort.abort(), 3000);
  $("mic-level").value = 0;
  $("bot-level").value = 0;
  setState(state, text);
}

function hangUp() {
  if (!call) return;
  const { ws, line: lineProtocol } = call;
  if (ws.readyState === WebSocket.OPEN) {
    ws.send(lineProtocol.stop()); // as Twilio does when the caller hangs up
    ws.close(1000);
  }
  finish("ended", "You hung up");
}

function press(digit) {
  if (!call || call.ws.readyState !== WebSocket.OPEN) return;
  call.ws.send(call.line.dtmf(digit)); // the transcript shows it once the bridge has it
}

$("call").onclick = async () => {
  if (protectedMode && !token.get()) {
    await askToken($("token-form"), "This bridge is protected: enter its API token (IVR_API_TOKEN) to call it.");
  }
  placeCall();
};
$("hangup").onclick = hangUp;
$("mute").onclick = () => {
  const muted = $("mute").getAttribute("aria-pressed") !== "true";
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute" : "Mute";
  call?.capture.port.postMessage({ type: "mute", muted });
};
$("keypad").onclick = (e) => {
  const digit = e.target.dataset?.digit;
  if (digit) press(digit);
};
document.addEventListener("keydown", (e) => {
  if (call && /^[0-9*#]$/.test(e.key) && e.target.tagName !== "INPUT") press(e.key);
});
setInterval(() => {
  if (call?.started) {
    const s = Math.floor((performance.now() - call.started) / 1000);
    $("timer").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }
}, 250);
