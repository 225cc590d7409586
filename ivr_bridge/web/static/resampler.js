// A streaming band-limited resampler: windowed-sinc interpolation at any rate ratio.
//
// Going down to 8 kHz it is the anti-alias filter (a browser captures at 44.1 or 48 kHz;
// dropping samples would fold everything above 4 kHz back into the call), and going up
// from 8 kHz it removes the images that would otherwise whistle above 4 kHz. The
// kernel is a Kaiser-windowed sinc cut off just below the lower rate's Nyquist
// frequency, tabulated once and interpolated linearly between table points.

const KAISER_BETA = 8.6; // about 86 dB of stop-band attenuation
const TABLE_STEPS = 512; // kernel table points per input sample

function besselI0(x) {
  let sum = 1;
  let term = 1;
  for (let k = 1; k < 50; k++) {
    term *= (x / (2 * k)) * (x / (2 * k));
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

export class Resampler {
  /**
   * @param {number} inRate input sample rate (Hz)
   * @param {number} outRate output sample rate (Hz)
   * @param {number} passband cut-off as a fraction of the lower rate's Nyquist frequency
   * @param {number} zeroCrossings kernel half-length in zero crossings of the sinc
   */
  constructor(inRate, outRate, passband = 0.92, zeroCrossings = 24) {
    this.step = inRate / outRate; // input samples per output sample
    const cutoff = (passband * Math.min(inRate, outRate)) / 2 / inRate; // cycles per input sample
    this.half = Math.ceil(zeroCrossings / (2 * cutoff)); // kernel half-width, input samples
    const points = this.half * TABLE_STEPS;
    this.table = new Float32Array(points + 2);
    const norm = besselI0(KAISER_BETA);
    for (let i = 0; i <= points; i++) {
      const t = i / TABLE_STEPS;
      const x = 2 * cutoff * t;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
      const r = t / this.half;
      const window = besselI0(KAISER_BETA * Math.sqrt(Math.max(0, 1 - r * r))) / norm;
      this.table[i] = 2 * cutoff * sinc * window;
    }
    // Input history: the kernel needs `half` samples each side of an output instant.
    this.buffer = new Float32Array(4096);
    this.length = this.half; // starts with `half` samples of silence
    this.position = this.half; // the next output instant, in buffer samples
  }

  /** Latency the filter adds, in input samples. */
  get delay() {
    return this.half;
  }

  /** Resample `input`; returns the output samples it completes (a new array). */
  process(input) {
    if (this.length + input.length > this.buffer.length) {
      const grown = new Float32Array(Math.max(this.buffer.length * 2, this.length + input.length));
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const available = Math.max(0, Math.floor((this.length - this.half - this.position) / this.step) + 1);
    const out = new Float32Array(this.position + this.half < this.length ? available : 0);
    const { buffer, table, half } = this;
    let n = 0;
    while (n < out.length && this.position + half < this.length) {
      const p = this.position;
      const first = Math.ceil(p - half);
      const last = Math.floor(p + half);
      let acc = 0;
      for (let k = first; k <= last; k++) {
        const d = Math.abs(k - p) * TABLE_STEPS;
        const i = d | 0;
        const w = table[i] + (table[i + 1] - table[i]) * (d - i);
        acc += buffer[k] * w;
      }
      out[n++] = acc;
      this.position += this.step;
    }
    // Drop what no later output needs.
    const keep = Math.floor(this.position - half);
    if (keep > 0) {
      buffer.copyWithin(0, keep, this.length);
      this.length -= keep;
      this.position -= keep;
    }
    return n === out.length ? out : out.subarray(0, n);
  }
}
