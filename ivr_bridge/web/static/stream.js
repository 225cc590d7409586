// The caller's side of a Twilio Media Stream, as Twilio speaks it (sans I/O): the
// messages a phone line sends, and the bridge's messages read back.
import { bytesToBase64 } from "./g711.js";

function hex(bytes) {
  const values = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class MediaStreamLine {
  constructor(callSid, parameters) {
    this.callSid = callSid;
    this.accountSid = "AC" + hex(16);
    this.streamSid = "MZ" + hex(16);
    this.parameters = parameters;
    this.sequence = 0;
    this.chunk = 0;
  }

  message(event, body) {
    this.sequence += 1;
    return JSON.stringify({
      event,
      sequenceNumber: String(this.sequence),
      streamSid: this.streamSid,
      ...body,
    });
  }

  /** What Twilio sends first: `connected` (not numbered), then `start`. */
  opening() {
    return [
      JSON.stringify({ event: "connected", protocol: "Call", version: "1.0.0" }),
      this.message("start", {
        start: {
          accountSid: this.accountSid,
          streamSid: this.streamSid,
          callSid: this.callSid,
          tracks: ["inbound"],
          customParameters: this.parameters,
          mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
        },
      }),
    ];
  }

  /** One 20 ms frame of caller audio (160 mu-law bytes). */
  media(payload) {
    this.chunk += 1;
    return this.message("media", {
      media: {
        track: "inbound",
        chunk: String(this.chunk),
        timestamp: String(20 * (this.chunk - 1)),
        payload: bytesToBase64(payload),
      },
    });
  }

  mark(name) {
    return this.message("mark", { mark: { name } });
  }

  dtmf(digit) {
    return this.message("dtmf", { dtmf: { track: "inbound_track", digit } });
  }

  stop() {
    return this.message("stop", { stop: { accountSid: this.accountSid, callSid: this.callSid } });
  }

  /** A message from the bridge: {event: "media", payload} | {event: "mark", name} |
   * {event: "clear"}, or null for anything else (ignored, as Twilio ignores it). */
  read(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return null;
    }
    if (!message || message.streamSid !== this.streamSid) return null;
    if (message.event === "media" && typeof message.media?.payload === "string") {
      return { event: "media", payload: message.media.payload };
    }
    if (message.event === "mark" && typeof message.mark?.name === "string") {
      return { event: "mark", name: message.mark.name };
    }
    if (message.event === "clear") return { event: "clear" };
    return null;
  }
}
