// The microphone, as a phone line: resampled to 8 kHz through the anti-alias filter,
// mu-law coded and cut into the 20 ms frames (160 bytes) Twilio sends.
import { encodeSample } from "./g711.js";
import { Resampler } from "./resampler.js";

const FRAME = 160; // 20 ms at 8 kHz
const LEVEL_EVERY = 2400; // input samples (about 50 ms) between level reports

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, 8000);
    this.frame = new Uint8Array(FRAME);
    this.filled = 0;
    this.muted = false;
    this.sumSquares = 0;
    this.counted = 0;
    this.port.onmessage = (e) => {
      if (e.data.type === "mute") this.muted = e.data.muted;
    };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet
    for (let i = 0; i < channel.length; i++) this.sumSquares += channel[i] * channel[i];
    this.counted += channel.length;
    if (this.counted >= LEVEL_EVERY) {
      this.port.postMessage({ type: "level", rms: Math.sqrt(this.sumSquares / this.counted) });
      this.sumSquares = 0;
      this.counted = 0;
    }
    const samples = this.resampler.process(channel);
    for (let i = 0; i < samples.length; i++) {
      const s = this.muted ? 0 : Math.round(samples[i] * 32767);
      this.frame[this.filled++] = encodeSample(s > 32767 ? 32767 : s < -32768 ? -32768 : s);
      if (this.filled === FRAME) {
        this.port.postMessage({ type: "frame", payload: this.frame });
        this.frame = new Uint8Array(FRAME);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
