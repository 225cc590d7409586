// G.711 mu-law, as Twilio Media Streams carry it: 8-bit codes of 14-bit linear samples.
const BIAS = 0x84;
const CLIP = 32635;

// Every code's linear value, decoded once.
export const MULAW_TO_PCM = new Int16Array(256);
for (let code = 0; code < 256; code++) {
  const u = ~code & 0xff;
  const magnitude = (((u & 0x0f) << 3) + BIAS) << ((u & 0x70) >> 4);
  MULAW_TO_PCM[code] = u & 0x80 ? BIAS - magnitude : magnitude - BIAS;
}

/** One linear sample (-32768..32767) to its mu-law code. */
export function encodeSample(sample) {
  let sign = 0;
  if (sample < 0) {
    sign = 0x80;
    sample = -sample;
  }
  if (sample > CLIP) sample = CLIP;
  sample += BIAS;
  let exponent = 7;
  for (let mask = 0x4000; (sample & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (sample >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

/** Float samples (-1..1) to mu-law codes, into `out`. */
export function encode(floats, out = new Uint8Array(floats.length)) {
  for (let i = 0; i < floats.length; i++) {
    const s = Math.round(floats[i] * 32767);
    out[i] = encodeSample(s > 32767 ? 32767 : s < -32768 ? -32768 : s);
  }
  return out;
}

/** Mu-law codes to float samples (-1..1). */
export function decode(codes, out = new Float32Array(codes.length)) {
  for (let i = 0; i < codes.length; i++) out[i] = MULAW_TO_PCM[codes[i]] / 32768;
  return out;
}

export function base64ToBytes(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

export function bytesToBase64(bytes) {
  let raw = "";
  for (let i = 0; i < bytes.length; i++) raw += String.fromCharCode(bytes[i]);
  return btoa(raw);
}
