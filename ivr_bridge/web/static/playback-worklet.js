// The bot's voice, played as Twilio plays it to a phone: 8 kHz audio queued in arrival
// order, each mark reported once the audio before it has been played out, and `clear`
// dropping what is queued and reporting its pending marks at once.
//
// The worklet's own sample counter is the playout clock: a mark's position is counted in
// 8 kHz samples fed to the resampler, and it is played once the resampler has been fed
// that far plus its own delay (the page adds the device's output latency before echoing).
import { Resampler } from "./resampler.js";

const LEVEL_EVERY = 2400;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(8000, sampleRate);
    this.ratio = 8000 / sampleRate;
    this.chunks = []; // Float32Array pieces of 8 kHz audio, oldest first
    this.offset = 0; // samples of chunks[0] already consumed
    this.queued = 0; // samples queued and not yet consumed
    this.fed = 0; // 8 kHz samples fed to the resampler, silence included: the playout clock
    this.marks = []; // {name, position}: pending, in order
    this.pending = new Float32Array(0); // resampler output not yet played
    this.sumSquares = 0;
    this.counted = 0;
    this.port.onmessage = (e) => this.command(e.data);
  }

  command(message) {
    if (message.type === "audio") {
      this.chunks.push(message.samples);
      this.queued += message.samples.length;
    } else if (message.type === "mark") {
      // Played once everything queued before it has been.
      this.marks.push({ name: message.name, position: this.fed + this.queued });
    } else if (message.type === "clear") {
      const dropped = this.queued;
      this.chunks = [];
      this.offset = 0;
      this.queued = 0;
      const names = this.marks.map((m) => m.name);
      this.marks = [];
      this.port.postMessage({ type: "cleared", names, droppedSamples: dropped });
    }
  }

  take(count) {
    // `count` 8 kHz samples from the queue, silence where it runs dry.
    const out = new Float32Array(count);
    let n = 0;
    while (n < count && this.chunks.length) {
      const head = this.chunks[0];
      const part = Math.min(count - n, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + part), n);
      n += part;
      this.offset += part;
      if (this.offset === head.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    this.queued -= n;
    this.fed += count;
    return out;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let filled = 0;
    while (filled < out.length) {
      if (this.pending.length === 0) {
        const need = Math.max(1, Math.ceil((out.length - filled) * this.ratio));
        this.pending = this.resampler.process(this.take(need));
        continue;
      }
      const part = Math.min(out.length - filled, this.pending.length);
      out.set(this.pending.subarray(0, part), filled);
      this.pending = this.pending.subarray(part);
      filled += part;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    // Played: what the resampler was fed, less its delay and what it still holds.
    const played = this.fed - this.resampler.delay - Math.ceil(this.pending.length * this.ratio);
    const done = [];
    while (this.marks.length && this.marks[0].position <= played) done.push(this.marks.shift().name);
    if (done.length) this.port.postMessage({ type: "played", names: done });
    for (let i = 0; i < out.length; i++) this.sumSquares += out[i] * out[i];
    this.counted += out.length;
    if (this.counted >= LEVEL_EVERY) {
      this.port.postMessage({
        type: "level",
        rms: Math.sqrt(this.sumSquares / this.counted),
        queuedMs: Math.round(this.queued / 8),
      });
      this.sumSquares = 0;
      this.counted = 0;
    }
    return true;
  }
}

registerProcessor("playback", PlaybackProcessor);
