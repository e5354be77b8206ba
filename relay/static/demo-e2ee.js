/*
 * relay demo: end-to-end encryption of media frames, in a dedicated worker.
 *
 * The page (demo.js) derives an AES-GCM key from the room's passphrase and posts it here; then
 * it hands this worker every sender and receiver of its calls, either as an
 * RTCRtpScriptTransform (the `rtctransform` event) or as the readable and writable streams of
 * createEncodedStreams() (a `streams` message). Senders encrypt every encoded frame, receivers
 * decrypt it; a frame that does not decrypt is dropped, never handed to the decoder, and
 * counted.
 *
 * Frame format (one encoded frame, as the Encoded Transform API hands it over):
 *
 *   +----------------+---------------------------------+-------------+---------+
 *   | clear header   | AES-GCM ciphertext + 16-byte tag | IV          | trailer |
 *   | N bytes        | of the rest of the frame         | 12 bytes    | 1 byte  |
 *   +----------------+---------------------------------+-------------+---------+
 *
 * N is what the relay and the receiving browser's depacketizer read of a frame:
 *   VP8 keyframe (bit 0 of the first byte is 0): 10 bytes, the 3-byte frame tag, the start
 *     code 9d 01 2a and the 16-bit width and height (RFC 6386 section 9.1);
 *   VP8 delta frame: 3 bytes, the frame tag;
 *   Opus: 1 byte, the TOC byte (RFC 6716 section 3.1).
 * The clear header is the additional authenticated data of the AES-GCM encryption, so it
 * cannot be changed either. The IV is 12 random bytes per frame. The trailer is the IV length
 * (12), which is also the format's version: a frame with another trailer is dropped. The RTP
 * payload descriptor that the browser's packetizer puts in front of every packet (VP8's
 * PictureID, TL0PICIDX and so on) is not part of the frame: it stays in the clear, as the
 * relay needs it to forward.
 */
'use strict';

const IV_LENGTH = 12;
const TAG_LENGTH = 16;
const TRAILER = IV_LENGTH;

let key = null;
// frames encrypted; per receiver id: frames decrypted and frames dropped
const counters = { encrypted: 0, unkeyed: 0, receivers: {} };

/** How many bytes at the start of a frame stay in the clear. */
function clearLength(kind, data) {
  if (data.length === 0) return 0;
  if (kind === 'audio') return 1;
  const keyframe = (data[0] & 0x01) === 0; // VP8 frame tag: P, the inverse key-frame flag
  return Math.min(keyframe ? 10 : 3, data.length);
}

async function encrypt(frame, controller, options) {
  const data = new Uint8Array(frame.data);
  if (data.length === 0) {
    controller.enqueue(frame);
    return;
  }
  if (!key) {
    counters.unkeyed += 1; // never send a frame in the clear
    return;
  }
  const clear = clearLength(options.kind, data);
  const header = data.subarray(0, clear);
  const iv = crypto.getRandomValues(new Uint8Array(IV_LENGTH));
  const sealed = new Uint8Array(await crypto.subtle.encrypt(
    { name: 'AES-GCM', iv, additionalData: header, tagLength: TAG_LENGTH * 8 }, key, data.subarray(clear)));
  const out = new Uint8Array(clear + sealed.length + IV_LENGTH + 1);
  out.set(header, 0);
  out.set(sealed, clear);
  out.set(iv, clear + sealed.length);
  out[out.length - 1] = TRAILER;
  frame.data = out.buffer;
  counters.encrypted += 1;
  controller.enqueue(frame);
}

async function decrypt(frame, controller, options) {
  const data = new Uint8Array(frame.data);
  if (data.length === 0) {
    controller.enqueue(frame);
    return;
  }
  const count = counters.receivers[options.id] ||
    (counters.receivers[options.id] = { decrypted: 0, failed: 0 });
  const clear = clearLength(options.kind, data);
  const end = data.length - 1 - IV_LENGTH; // where the IV starts
  if (!key || data[data.length - 1] !== TRAILER || end - clear < TAG_LENGTH) {
    count.failed += 1;
    return;
  }
  let plain;
  try {
    plain = new Uint8Array(await crypto.subtle.decrypt(
      { name: 'AES-GCM', iv: data.subarray(end, end + IV_LENGTH), additionalData: data.subarray(0, clear),
        tagLength: TAG_LENGTH * 8 },
      key, data.subarray(clear, end)));
  } catch (error) {
    count.failed += 1; // another key, or the frame was changed on the way
    return;
  }
  const out = new Uint8Array(clear + plain.length);
  out.set(data.subarray(0, clear), 0);
  out.set(plain, clear);
  frame.data = out.buffer;
  count.decrypted += 1;
  controller.enqueue(frame);
}

/** options: { side: 'send' | 'receive', kind: 'audio' | 'video', id } */
function transform(readable, writable, options) {
  const step = options.side === 'send' ? encrypt : decrypt;
  readable
    .pipeThrough(new TransformStream({ transform: (frame, controller) => step(frame, controller, options) }))
    .pipeTo(writable)
    .catch(() => {}); // the connection closed
}

self.onrtctransform = (event) => {
  const { readable, writable, options } = event.transformer;
  transform(readable, writable, options);
};

self.onmessage = (event) => {
  const message = event.data;
  if (message.type === 'key') key = message.key;
  else if (message.type === 'streams') transform(message.readable, message.writable, message.options);
};

setInterval(() => self.postMessage({ type: 'counters', counters }), 1000);
