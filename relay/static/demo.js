/*
 * relay demo: a group call in the browser through the relay's control API.
 *
 * Two peer connections per participant: the publisher (this page offers sendonly audio and
 * video, POST .../publisher) and the subscriber (the relay offers one m-line per forwarded
 * track, POST .../subscriber; this page answers, PUT .../subscriber with the revision, and
 * fetches a fresh offer on 409). The room's events arrive over GET /v1/events read with
 * fetch(), which can send the participant token in the Authorization header. Remote tiles are
 * keyed by the msid stream id of the subscriber offer, which is the publisher's participant id;
 * the msid track id is the relay's track id.
 *
 * Simulcast: the camera is published with up to three layers (a quarter, half and full size)
 * when the browser takes them, as many as the picture is big enough for. For every remote
 * video the page tells the relay what it wants (PUT .../subscriptions/{track_id}): no more
 * than the tile shows, in device pixels, rounded up to a step, and nothing while the tile is
 * out of view or the page is hidden. On publisher.layers for its own video it pauses the
 * layers nobody receives.
 *
 * Credentials: a participant token from the URL fragment
 *   #room=ROOM&participant=ID&token=JWT
 * (how a signaling server hands one out), or else one from POST /demo/token, which exists only
 * while the demo is enabled and the relay's API listens on loopback.
 *
 * Other fragment options: join (join at once), recvonly, codec=vp8|vp9|h264|av1 (preferred
 * video codec), width, height, fps (camera constraints), simulcast=0 (one video layer),
 * report=URL (POST a statistics summary there every second; loopback URLs only, for automated
 * tests), passphrase (see below; removed from the address bar at once), transform=streams
 * (encrypt with createEncodedStreams() even where RTCRtpScriptTransform exists, for tests).
 *
 * Chat: the publisher connection carries a data channel labelled "chat" (a receive-only page
 * publishes that channel alone, when its token allows publishing); the relay relays what is sent on it to everyone else, and a
 * channel whose protocol is "to:<participant>" to that participant only. What the others send
 * arrives on channels the relay opens on the subscriber connection, whose protocol names the
 * sender ("from:<id>", or "from:<id>;to:<me>" for a message to this page alone). For tests:
 * chat=TEXT sends "TEXT #n" to the room every second for 30 s, and with chatto=PARTICIPANT
 * also "TEXT (to PARTICIPANT) #n" to that participant alone; window.demoChat.send(text, to)
 * sends one message. In an end-to-end encrypted room the messages are encrypted with the
 * room's key (AES-GCM, a random 12-byte IV first, the label as additional data) and travel
 * as binary messages: the relay relays what it cannot read, as it does for the frames.
 *
 * End-to-end encryption: with a passphrase the page joins an end-to-end encrypted room. It
 * derives an AES-GCM key from the passphrase (PBKDF2, see e2eeKey) and encrypts every media
 * frame it sends, and decrypts every frame it receives, in a worker (demo-e2ee.js, which
 * documents the frame format) through the Encoded Transform API; the relay forwards the frames
 * unchanged. Video is sent as VP8 then: which bytes of a frame stay in the clear is codec
 * specific. A frame that does not decrypt is dropped and counted. Without a passphrase, in a
 * room that requires end-to-end encryption, the page says so and leaves instead of showing what
 * it cannot decrypt.
 */
'use strict';

(() => {
  const ID = /^[A-Za-z0-9._-]{1,64}$/;
  const PC_CONFIG = { iceServers: [], bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' };
  const STATS_INTERVAL_MS = 1000;
  const MAX_NOTICES = 8;
  const MAX_EVENTS = 100;
  // The camera's simulcast layers, lowest first. libwebrtc sends no more layers than the
  // picture has pixels for (three from 960x540, two from 480x270) and drops the top ones, the
  // full-size picture first: a smaller camera is offered only the layers it will send.
  const SIMULCAST_ENCODINGS = [
    { rid: 'q', scaleResolutionDownBy: 4 },
    { rid: 'h', scaleResolutionDownBy: 2 },
    { rid: 'f' },
  ];
  const SIMULCAST_PIXELS = [[960 * 540, 3], [480 * 270, 2]];
  // What a remote tile asks of its video: its size in device pixels rounded up to these steps
  // (past the last one, no limit), after the tile has kept still for WISH_DELAY_MS.
  const WISH_WIDTHS = [160, 320, 640, 1280, 1920, 3840];
  const WISH_HEIGHTS = [90, 180, 360, 720, 1080, 2160];
  const WISH_DELAY_MS = 500;
  // The relay chooses among the layers it receives, and calls unused those it has not received
  // yet: a layer is paused only once it has been sent for LAYER_GRACE_MS (the browser starts
  // its layers as its bandwidth estimate grows), and every LAYER_PROBE_MS the paused ones are
  // sent again so that a subscriber that wants more (or less) can move to them.
  const LAYER_GRACE_MS = 3000;
  const LAYER_PROBE_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const fragment = new URLSearchParams(location.hash.slice(1));
  const flag = (name) => fragment.has(name) && !['0', 'false', 'no'].includes(fragment.get(name));

  const options = {
    room: fragment.get('room') || '',
    participant: fragment.get('participant') || '',
    token: fragment.get('token') || '',
    join: flag('join') || fragment.has('token'),
    recvonly: flag('recvonly'),
    codec: (fragment.get('codec') || '').toLowerCase(),
    width: Number(fragment.get('width')) || 640,
    height: Number(fragment.get('height')) || 480,
    fps: Number(fragment.get('fps')) || 30,
    // simulcast=0: publish the camera as a single layer
    simulcast: !fragment.has('simulcast') || flag('simulcast'),
    // "noise": a moving noise picture instead of the camera, which an encoder cannot compress
    // below the bitrate it is allowed (to measure how fast the sender's estimate ramps up; sent
    // as one layer, so that one encoder takes all of it)
    source: fragment.get('source') || 'camera',
    report: loopbackUrl(fragment.get('report')),
    passphrase: fragment.get('passphrase') || '',
    transform: fragment.get('transform') || '',
  };
  if (fragment.has('passphrase')) {
    // keep the passphrase out of the address bar and the history
    const kept = new URLSearchParams(fragment);
    kept.delete('passphrase');
    history.replaceState(null, '', `#${kept}`);
  }

  function loopbackUrl(text) {
    if (!text) return null;
    try {
      const url = new URL(text);
      const local = ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
      return url.protocol === 'http:' && local ? url.href : null;
    } catch {
      return null;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Notices, status and the record kept for the statistics report

  const record = {
    state: 'idle',
    error: null,
    participant: null,
    room: null,
    mode: null,
    notices: [],
    events: [],
    firstFrame: {},
    joinedAt: null,
    marks: {},
    // end-to-end encryption: the API used and frame counters (null without a passphrase), and
    // whether the relay said the room requires it
    e2ee: null,
    e2eeRequired: false,
    // chat messages received (the latest 300): { from, direct, label, text }
    chat: [],
    chatSent: 0,
  };

  /** Milliseconds from page load to a step of joining (the first time it happens). */
  function mark(name) {
    if (record.marks[name] === undefined) record.marks[name] = Math.round(performance.now());
  }

  function notice(text, isError = false) {
    const list = $('notices');
    const item = document.createElement('li');
    item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    if (isError) item.className = 'error';
    list.prepend(item);
    while (list.children.length > MAX_NOTICES) list.lastChild.remove();
    record.notices.push(text);
    if (record.notices.length > 50) record.notices.shift();
    (isError ? console.error : console.info)('[relay demo]', text);
  }

  function setStatus(text) {
    $('status').textContent = text;
  }

  // ------------------------------------------------------------------------------------------
  // Control API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message || `HTTP ${status}`);
      this.status = status;
      this.code = code;
    }

    static async from(response) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        // not JSON
      }
      const error = (body && body.error) || {};
      return new ApiError(response.status, error.code || null, error.message || null);
    }
  }

  class Api {
    constructor(room, participant, token) {
      this.room = room;
      this.participant = participant;
      this.token = token;
      this.base = `/v1/rooms/${encodeURIComponent(room)}/participants/${encodeURIComponent(participant)}`;
    }

    headers(extra = {}) {
      return { Authorization: `Bearer ${this.token}`, ...extra };
    }

    async call(method, path, body) {
      const init = { method, headers: this.headers(), cache: 'no-store' };
      if (body !== undefined) {
        init.headers['Content-Type'] = 'application/json';
        init.body = JSON.stringify(body);
      }
      const response = await fetch(path, init);
      if (!response.ok) throw await ApiError.from(response);
      return response.status === 204 ? null : response.json();
    }
  }

  async function devToken(room, participant, canPublish, e2ee) {
    const body = { room_id: room, can_publish: canPublish, can_subscribe: true, e2ee };
    if (participant) body.participant_id = participant;
    const response = await fetch('/demo/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
      cache: 'no-store',
    });
    if (response.status === 404 || response.status === 405) {
      throw new Error(
        'this relay hands out no development tokens (POST /demo/token exists only with ' +
        'demo.enabled on a loopback api.host): open this page with ' +
        '#room=ROOM&participant=ID&token=TOKEN from your signaling server',
      );
    }
    if (!response.ok) throw await ApiError.from(response);
    return response.json();
  }

  // ------------------------------------------------------------------------------------------
  // Server-Sent Events over fetch(): reconnects until closed

  class EventStream {
    constructor(api, onEvent, onState) {
      this.api = api;
      this.onEvent = onEvent;
      this.onState = onState;
      this.controller = null;
      this.closed = false;
    }

    /** Resolves once the relay has registered the stream (response headers received). */
    async open() {
      const reader = await this.connect();
      this.pump(reader);
    }

    async connect() {
      this.controller = new AbortController();
      const url = `/v1/events?room_id=${encodeURIComponent(this.api.room)}`;
      const response = await fetch(url, {
        headers: this.api.headers({ Accept: 'text/event-stream' }),
        signal: this.controller.signal,
        cache: 'no-store',
      });
      if (!response.ok) throw await ApiError.from(response);
      this.onState('open');
      return response.body.getReader();
    }

    async pump(reader) {
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        try {
          const { value, done } = await reader.read();
          if (done) throw new Error('event stream ended');
          buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            this.dispatch(block);
          }
        } catch (error) {
          if (this.closed) return;
          this.onState('reconnecting');
          buffer = '';
          reader = await this.reconnect();
          if (!reader) return;
        }
      }
    }

    async reconnect() {
      for (let delay = 500; !this.closed; delay = Math.min(delay * 2, 5000)) {
        await sleep(delay);
        if (this.closed) return null;
        try {
          const reader = await this.connect();
          this.onEvent({ type: 'stream.reconnected' });
          return reader;
        } catch (error) {
          if (error instanceof ApiError && [401, 403, 404].includes(error.status)) {
            this.onState(`closed (${error.message})`);
            return null;
          }
        }
      }
      return null;
    }

    dispatch(block) {
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (!data.length) return; // comment, keepalive or retry hint
      try {
        this.onEvent(JSON.parse(data.join('\n')));
      } catch (error) {
        notice(`bad event: ${error.message}`, true);
      }
    }

    close() {
      this.closed = true;
      if (this.controller) this.controller.abort();
    }
  }

  // ------------------------------------------------------------------------------------------
  // SDP: what each m-line of the relay's subscriber offer carries

  function describeMedia(sdp) {
    const media = new Map();
    for (const section of sdp.split(/\r?\n(?=m=)/).slice(1)) {
      const lines = section.split(/\r?\n/);
      const info = { kind: lines[0].slice(2).split(' ')[0], stream: null, track: null, direction: 'sendrecv', ssrc: null };
      let mid = null;
      for (const line of lines) {
        if (line.startsWith('a=mid:')) mid = line.slice(6).trim();
        else if (line.startsWith('a=msid:')) [info.stream, info.track = null] = line.slice(7).trim().split(' ');
        else if (/^a=(sendrecv|sendonly|recvonly|inactive)\s*$/.test(line)) info.direction = line.slice(2).trim();
        else if (line.startsWith('a=ssrc:') && info.ssrc === null) info.ssrc = Number(line.slice(7).split(' ')[0]);
      }
      if (mid !== null) media.set(mid, info);
    }
    return media;
  }

  function preferCodec(transceiver, name) {
    const wanted = `video/${name}`;
    const sorted = (codecs) => {
      const matches = codecs.filter((c) => c.mimeType.toLowerCase() === wanted);
      // H.264: the relay forwards packetization-mode=1 only
      matches.sort((a, b) => Number(/packetization-mode=1/.test(b.sdpFmtpLine || '')) -
        Number(/packetization-mode=1/.test(a.sdpFmtpLine || '')));
      return [...matches, ...codecs.filter((c) => !matches.includes(c))];
    };
    for (const source of [RTCRtpReceiver, RTCRtpSender]) {
      const capabilities = source.getCapabilities && source.getCapabilities('video');
      if (!capabilities) continue;
      const codecs = sorted(capabilities.codecs);
      if (codecs[0].mimeType.toLowerCase() !== wanted) continue;
      try {
        transceiver.setCodecPreferences(codecs);
        return true;
      } catch (error) {
        // try the other list
      }
    }
    notice(`this browser cannot send ${name.toUpperCase()}; using its default codec`, true);
    return false;
  }

  function videoCodecs() {
    const capabilities = window.RTCRtpSender && RTCRtpSender.getCapabilities &&
      RTCRtpSender.getCapabilities('video');
    return capabilities ? capabilities.codecs.map((c) => `${c.mimeType} ${c.sdpFmtpLine || ''}`.trim()) : [];
  }

  // ------------------------------------------------------------------------------------------
  // End-to-end encryption: the key, and the worker that encrypts and decrypts the frames

  // PBKDF2-HMAC-SHA256 over the passphrase, 600000 iterations (OWASP's figure for
  // PBKDF2-SHA256; a few hundred milliseconds, once per join, while the page gets its token),
  // salted with the room id so that one passphrase gives every room another key. The key:
  // AES-GCM, 128 bits.
  const E2EE_ITERATIONS = 600000;
  const E2EE_SALT_PREFIX = 'relay-demo-e2ee/';
  const E2EE_NEEDED = 'this room is end-to-end encrypted: enter its passphrase to join';

  async function e2eeKey(passphrase, room) {
    const encoder = new TextEncoder();
    const material = await crypto.subtle.importKey('raw', encoder.encode(passphrase), 'PBKDF2', false, ['deriveKey']);
    return crypto.subtle.deriveKey(
      { name: 'PBKDF2', hash: 'SHA-256', salt: encoder.encode(E2EE_SALT_PREFIX + room), iterations: E2EE_ITERATIONS },
      material, { name: 'AES-GCM', length: 128 }, false, ['encrypt', 'decrypt']);
  }

  /** The frame encryption of one call: a worker (demo-e2ee.js) holding the key. */
  class FrameCrypto {
    /** 'script-transform' (RTCRtpScriptTransform), 'insertable-streams' or null. */
    static api() {
      if (options.transform !== 'streams' && window.RTCRtpScriptTransform) return 'script-transform';
      if (window.RTCRtpSender && 'createEncodedStreams' in RTCRtpSender.prototype) return 'insertable-streams';
      return null;
    }

    static async create(passphrase, room) {
      if (!window.crypto || !crypto.subtle) {
        throw new Error('end-to-end encryption needs a secure page: https://, or http://localhost');
      }
      const api = FrameCrypto.api();
      if (!api) throw new Error('this browser cannot encrypt media frames (no Encoded Transform API)');
      return new FrameCrypto(api, await e2eeKey(passphrase, room));
    }

    constructor(api, key) {
      this.api = api;
      this.key = key; // also the chat's (AES-GCM, a random IV per message)
      this.worker = new Worker('/demo/demo-e2ee.js');
      this.worker.postMessage({ type: 'key', key });
      this.counters = { encrypted: 0, unkeyed: 0, receivers: {} };
      this.worker.onmessage = (event) => {
        if (event.data.type === 'counters') this.counters = event.data.counters;
      };
      this.ids = new WeakMap(); // sender or receiver -> its transform's id
      this.receivers = new Map(); // transform id -> { kind, participant }
      this.next = 0;
    }

    /**
     * RTCPeerConnection configuration: createEncodedStreams() needs to be asked for. Chromium
     * wants it for RTCRtpScriptTransform on receivers too: without it (seen in Chromium 156),
     * an audio receiver given its transform in ontrack, the earliest a subscriber can, never
     * handed the transform a frame.
     */
    config(base) {
      const streams = window.RTCRtpSender && 'createEncodedStreams' in RTCRtpSender.prototype;
      return streams ? { ...base, encodedInsertableStreams: true } : base;
    }

    /** Encrypt what a sender sends, or decrypt what a receiver receives (once for each). */
    attach(endpoint, side, kind) {
      if (this.ids.has(endpoint)) return;
      const id = this.next++;
      this.ids.set(endpoint, id);
      if (side === 'receive') this.receivers.set(id, { kind, participant: null });
      const transformOptions = { side, kind, id };
      if (this.api === 'script-transform') {
        endpoint.transform = new RTCRtpScriptTransform(this.worker, transformOptions);
      } else {
        const { readable, writable } = endpoint.createEncodedStreams();
        this.worker.postMessage({ type: 'streams', readable, writable, options: transformOptions },
          [readable, writable]);
      }
    }

    /** Whose media a receiver carries now (the msid stream id of its m-line). */
    label(receiver, participant) {
      const id = this.ids.get(receiver);
      if (id !== undefined) this.receivers.get(id).participant = participant;
    }

    /** Per participant and kind: frames decrypted, and frames dropped (they did not decrypt). */
    received() {
      const result = {};
      for (const [id, count] of Object.entries(this.counters.receivers)) {
        const receiver = this.receivers.get(Number(id));
        if (!receiver || !receiver.participant) continue;
        const kinds = result[receiver.participant] || (result[receiver.participant] = {});
        const total = kinds[receiver.kind] || (kinds[receiver.kind] = { decrypted: 0, failed: 0 });
        total.decrypted += count.decrypted;
        total.failed += count.failed;
      }
      return result;
    }

    summary() {
      return { api: this.api, encrypted: this.counters.encrypted, received: this.received() };
    }

    close() {
      this.worker.terminate();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Tiles

  class Tile {
    constructor(id, label, local) {
      this.id = id;
      this.tracks = [];
      this.bytes = null;
      // remote tiles: the relay's id of the video shown, what the page last asked of it (the
      // relay's defaults for a new subscription), and whether and how large the tile shows
      this.videoTrackId = null;
      this.asked = null;
      this.view = { intersecting: true, width: 0, height: 0 };
      this.wishTimer = null;
      this.wishing = null;
      this.el = document.createElement('figure');
      this.el.className = local ? 'tile local' : 'tile';
      this.el.dataset.participant = id;
      this.video = document.createElement('video');
      this.video.autoplay = true;
      this.video.playsInline = true;
      if (local) this.video.muted = true;
      this.placeholder = document.createElement('div');
      this.placeholder.className = 'placeholder';
      this.placeholder.textContent = local ? 'camera off' : 'waiting for video';
      const caption = document.createElement('figcaption');
      this.name = document.createElement('span');
      this.name.textContent = label;
      this.badges = document.createElement('span');
      this.badges.className = 'badges';
      caption.append(this.name, this.badges);
      this.stats = document.createElement('pre');
      this.stats.className = 'stats';
      this.el.append(this.video, this.placeholder, caption, this.stats);
      if (local) $('tiles').prepend(this.el); // your own tile first
      else $('tiles').append(this.el);
    }

    setTracks(tracks) {
      const same = tracks.length === this.tracks.length && tracks.every((t) => this.tracks.includes(t));
      if (same) return;
      this.tracks = tracks;
      this.video.srcObject = new MediaStream(tracks);
      this.placeholder.hidden = tracks.some((t) => t.kind === 'video');
      this.play();
      if (!this.el.classList.contains('local')) this.watchFirstFrame();
    }

    play() {
      this.video.play().catch(() => {
        // Autoplay with sound refused (no user gesture yet): play muted until a click.
        this.video.muted = true;
        this.video.play().catch(() => {});
        document.addEventListener('click', () => { this.video.muted = false; }, { once: true });
        notice('sound is blocked by the browser until you click the page');
      });
    }

    watchFirstFrame() {
      if (record.firstFrame[this.id] !== undefined) return;
      const seen = () => {
        if (record.firstFrame[this.id] === undefined) {
          record.firstFrame[this.id] = performance.now();
          mark('firstFrame');
          notice(`first frame from ${this.id} ${(performance.now() / 1000).toFixed(2)} s after page load`);
        }
      };
      if (this.video.requestVideoFrameCallback) this.video.requestVideoFrameCallback(seen);
      else this.video.addEventListener('loadeddata', seen, { once: true });
    }

    setBadges(text) {
      this.badges.textContent = text;
    }

    remove() {
      clearTimeout(this.wishTimer);
      this.video.srcObject = null;
      this.el.remove();
    }
  }

  // ------------------------------------------------------------------------------------------
  // A call

  class Call {
    /** frameCrypto: a FrameCrypto in an end-to-end encrypted call, else null. */
    constructor(credentials, frameCrypto = null) {
      this.api = new Api(credentials.room_id, credentials.participant_id, credentials.token);
      this.me = credentials.participant_id;
      this.e2ee = frameCrypto;
      this.pcConfig = frameCrypto ? frameCrypto.config(PC_CONFIG) : PC_CONFIG;
      record.e2ee = frameCrypto ? frameCrypto.summary() : null;
      this.local = null;
      this.pub = null;
      this.sub = null;
      this.events = null;
      this.tiles = new Map();
      this.receivers = new Map();
      this.muted = new Map(); // participant id -> set of muted track ids
      this.gone = new Set();
      this.remoteSdp = '';
      this.applied = -1;
      this.chain = Promise.resolve();
      this.timer = null;
      this.states = { publisher: 'none', subscriber: 'new', events: 'connecting' };
      this.ended = false;
      this.leaving = null; // why this page is leaving (it asked the relay to remove it)
      this.last = { out: null, at: 0 };
      this.layers = null; // the latest publisher.layers for this page's video: { wanted, unused }
      this.layerTimer = null;
      this.layerChain = Promise.resolve(); // setParameters calls, one after the other
      this.sending = new Map(); // rid -> { frames, since }: since when the layer is sent
      this.probedAt = 0;
      // remote tiles in view and their sizes, for what the page asks of their video
      this.onVisibility = () => this.wishAll();
      document.addEventListener('visibilitychange', this.onVisibility);
      this.inView = new IntersectionObserver((entries) => {
        for (const entry of entries) {
          const tile = this.tileOf(entry.target);
          if (!tile) continue;
          tile.view.intersecting = entry.isIntersecting;
          this.wishSoon(tile);
        }
      });
      this.sizes = new ResizeObserver((entries) => {
        for (const entry of entries) {
          const tile = this.tileOf(entry.target);
          if (!tile) continue;
          tile.view.width = entry.contentRect.width;
          tile.view.height = entry.contentRect.height;
          this.wishSoon(tile);
        }
      });
    }

    /**
     * Join: the event stream first (so that no renegotiation is missed), then the subscriber
     * connection, while the camera may still be opening; then publish what the camera gives.
     */
    async start(camera) {
      record.state = 'joining';
      this.events = new EventStream(this.api, (event) => this.onEvent(event), (state) => {
        this.states.events = state;
        this.showStates();
      });
      await this.events.open();
      mark('events');
      this.sub = new RTCPeerConnection(this.pcConfig);
      this.watch(this.sub, 'subscriber');
      this.sub.ondatachannel = (event) => this.chatChannel(event.channel);
      this.sub.ontrack = (event) => {
        // before any frame of it arrives: nothing undecrypted reaches the decoder
        if (this.e2ee) this.e2ee.attach(event.receiver, 'receive', event.track.kind);
        this.reconcile();
      };
      const subscribed = this.negotiateNow().then(() => mark('subscribed'));
      this.chain = subscribed.catch(() => {}); // later renegotiations queue behind this one
      const local = await camera;
      mark('camera');
      if (this.ended) {
        if (local) for (const track of local.getTracks()) track.stop();
        return;
      }
      this.local = local;
      record.mode = local ? 'sendrecv' : 'recvonly';
      enableMute(Boolean(local));
      this.showStates();
      if (local) {
        const tile = new Tile(this.me, `${this.me} (you)`, true);
        tile.setTracks(local.getTracks());
        this.tiles.set(this.me, tile);
        this.states.publisher = 'new';
        await this.publish();
        mark('published');
      } else {
        // the chat channel alone; a participant that may not publish receives no chat either
        try {
          this.states.publisher = 'new';
          await this.publish();
        } catch (error) {
          if (this.pub) this.pub.close();
          this.pub = null;
          this.states.publisher = 'none';
          this.showStates();
          notice(`no chat: ${error.message}`);
        }
      }
      await subscribed;
      this.startChatAutomation();
      record.state = 'joined';
      this.timer = setInterval(() => this.updateStats().catch((e) => notice(`stats: ${e.message}`, true)),
        STATS_INTERVAL_MS);
    }

    watch(pc, name) {
      pc.addEventListener('connectionstatechange', () => {
        this.states[name] = pc.connectionState;
        if (pc.connectionState === 'connected') mark(`${name}Connected`);
        this.showStates();
        if (pc.connectionState === 'failed') {
          notice(`${name} connection failed`, true);
          if (onlyLoopback(pc.remoteDescription)) {
            notice('the relay offers only a loopback media address (127.0.0.1), which some ' +
              'browsers (Firefox) do not connect to: set [media] host to 0.0.0.0 (the default) ' +
              'or to your machine\'s network address', true);
          }
        }
      });
      pc.addEventListener('iceconnectionstatechange', () => {
        this.states[`${name}Ice`] = pc.iceConnectionState;
      });
    }

    showStates() {
      const s = this.states;
      const parts = [];
      if (s.publisher !== 'none') parts.push(`publisher: ${s.publisher}`);
      parts.push(`subscriber: ${s.subscriber}`, `events: ${s.events}`);
      $('connection').textContent = parts.join(' · ');
      const connected = s.subscriber === 'connected' && ['connected', 'none'].includes(s.publisher);
      const notes = [record.mode === 'recvonly' && 'receive only', this.e2ee && 'end-to-end encrypted']
        .filter(Boolean);
      setStatus(connected
        ? `In room ${this.api.room} as ${this.me}${notes.length ? ` (${notes.join(', ')})` : ''}.`
        : `Connecting to room ${this.api.room}…`);
    }

    async publish() {
      const pc = this.pub = new RTCPeerConnection(this.pcConfig);
      this.watch(pc, 'publisher');
      for (const track of this.local ? this.local.getTracks() : []) {
        const transceiver = this.addSender(pc, track);
        // end-to-end encrypted: VP8, whose clear header bytes the frame format knows
        const codec = this.e2ee ? 'vp8' : options.codec;
        if (track.kind === 'video' && codec) preferCodec(transceiver, codec);
        if (this.e2ee) this.e2ee.attach(transceiver.sender, 'send', track.kind);
      }
      this.chatOut = new Map(); // '' (the room) or a participant id -> data channel
      this.chatOutChannel(''); // after the transceivers: the same transport (BUNDLE)
      await pc.setLocalDescription(await pc.createOffer());
      const answer = await this.api.call('POST', `${this.api.base}/publisher`,
        { type: 'offer', sdp: pc.localDescription.sdp });
      await pc.setRemoteDescription(answer);
    }

    /**
     * The camera with its simulcast layers when the browser takes them (as many as the
     * picture is big enough for, the full size always among them), else as one encoding.
     */
    addSender(pc, track) {
      const init = { direction: 'sendonly', streams: [this.local] };
      const settings = track.kind === 'video' ? track.getSettings() : {};
      const pixels = (settings.width || options.width) * (settings.height || options.height);
      const [, count] = SIMULCAST_PIXELS.find(([least]) => pixels >= least) || [0, 1];
      if (options.simulcast && options.source !== 'noise' && track.kind === 'video' && count > 1) {
        const layers = SIMULCAST_ENCODINGS.slice(-count);
        try {
          const transceiver = pc.addTransceiver(track,
            { ...init, sendEncodings: layers.map((e) => ({ ...e })) });
          const encodings = transceiver.sender.getParameters().encodings || [];
          if (encodings.length === layers.length) {
            this.layerTimer = setInterval(() => this.applyLayers(), STATS_INTERVAL_MS);
            return transceiver;
          }
          pc.removeTrack(transceiver.sender); // took fewer layers: publish it plainly instead
          transceiver.stop();
        } catch (error) {
          // no simulcast here
        }
        notice('this browser does not send simulcast; publishing one video layer');
      }
      return pc.addTransceiver(track, init);
    }

    /** The sender of this page's simulcast video, if any. */
    simulcastSender() {
      if (!this.pub) return null;
      return this.pub.getSenders().find((s) => s.track && s.track.kind === 'video' &&
        (s.getParameters().encodings || []).length > 1) || null;
    }

    /**
     * Layers as publisher.layers last said (on each one, and every second): a layer nobody
     * receives is paused once it has been sent for a while, the others are sent; all of them
     * while nobody receives any (the next subscriber gets the best at once) and, briefly,
     * every LAYER_PROBE_MS. The lowest is always sent: it costs little, and a subscriber that
     * asks for less moves to it at once (one that asks for more waits for the next probe).
     */
    applyLayers() {
      this.layerChain = this.layerChain.then(() => this.applyLayersNow()).catch((error) => {
        notice(`could not change the simulcast layers: ${error.message}`, true);
      });
      return this.layerChain;
    }

    async applyLayersNow() {
      const sender = this.simulcastSender();
      if (!sender || this.ended) return;
      const now = performance.now();
      const frames = new Map();
      (await sender.getStats()).forEach((s) => {
        if (s.type === 'outbound-rtp' && s.rid !== undefined) frames.set(s.rid, s.framesEncoded || 0);
      });
      const parameters = sender.getParameters();
      const probe = now - this.probedAt >= LAYER_PROBE_MS && parameters.encodings.some((e) => e.active === false);
      if (probe) this.probedAt = now;
      const unused = new Set(this.layers && this.layers.wanted.length ? this.layers.unused : []);
      unused.delete(parameters.encodings[0].rid);
      let changed = false;
      for (const encoding of parameters.encodings) {
        const was = encoding.active !== false;
        // since when the layer's frames are encoded (browsers without rid stats: since active)
        const count = frames.has(encoding.rid) ? frames.get(encoding.rid) : null;
        const before = this.sending.get(encoding.rid);
        const grows = count === null || (before && count > before.frames);
        const since = was && grows ? (before && before.since !== null ? before.since : now) : null;
        this.sending.set(encoding.rid, { frames: count ?? 0, since });
        let active = !unused.has(encoding.rid) || probe;
        if (!active && was) active = since === null || now - since < LAYER_GRACE_MS;
        if (active !== was) {
          encoding.active = active;
          changed = true;
          if (!active) {
            this.sending.set(encoding.rid, { frames: count ?? 0, since: null });
            this.probedAt = now; // the next probe counts from the latest pause
          }
        }
      }
      if (!changed) return;
      await sender.setParameters(parameters);
      const paused = parameters.encodings.filter((e) => e.active === false).map((e) => e.rid);
      console.info('[relay demo]', `simulcast layers paused: ${paused.join(', ') || 'none'}`);
    }

    /** rid -> sent (active) of this page's simulcast video, for the report; null without. */
    layerStates() {
      const sender = this.simulcastSender();
      if (!sender) return null;
      return Object.fromEntries(sender.getParameters().encodings.map((e) => [e.rid, e.active !== false]));
    }

    tileOf(element) {
      const tile = this.tiles.get(element.dataset.participant);
      return tile && tile.el === element ? tile : null;
    }

    /** What a remote tile wants of its video now (a PUT .../subscriptions body). */
    wishFor(tile) {
      const { width, height } = tile.view;
      const shown = width > 0 && height > 0;
      const wish = { paused: document.visibilityState === 'hidden' || !tile.view.intersecting || !shown };
      if (!shown) return wish; // hidden by the layout: keep the size asked before
      // object-fit: cover fills the tile, so the picture must cover it in both directions
      const ratio = devicePixelRatio || 1;
      const video = tile.video;
      const aspect = video.videoWidth && video.videoHeight ? video.videoWidth / video.videoHeight : width / height;
      const step = (value, steps) => steps.find((s) => s >= Math.ceil(value * ratio)) ?? null;
      wish.max_width = step(Math.max(width, height * aspect), WISH_WIDTHS);
      wish.max_height = step(Math.max(height, width / aspect), WISH_HEIGHTS);
      if (wish.max_width === null || wish.max_height === null) wish.max_width = wish.max_height = null;
      return wish;
    }

    wishSoon(tile) {
      clearTimeout(tile.wishTimer);
      tile.wishTimer = setTimeout(() => this.wish(tile), WISH_DELAY_MS);
    }

    wishAll() {
      for (const [id, tile] of this.tiles) if (id !== this.me) this.wishSoon(tile);
    }

    /** Tell the relay what changed in what the tile wants; one request at a time per tile. */
    async wish(tile) {
      if (this.ended || !tile.videoTrackId || this.tiles.get(tile.id) !== tile) return;
      if (tile.wishing) {
        tile.wishing.again = true;
        return;
      }
      const trackId = tile.videoTrackId;
      const wanted = this.wishFor(tile);
      const changes = {};
      for (const [key, value] of Object.entries(wanted)) if (tile.asked[key] !== value) changes[key] = value;
      if (!Object.keys(changes).length) return;
      tile.wishing = { again: false };
      try {
        await this.api.call('PUT',
          `${this.api.base}/subscriptions/${encodeURIComponent(trackId)}`, changes);
        if (tile.videoTrackId === trackId) Object.assign(tile.asked, changes);
      } catch (error) {
        // 404: the track went away meanwhile (the next offer drops it)
        if (error.status !== 404) notice(`could not update the subscription to ${tile.id}: ${error.message}`, true);
      } finally {
        const { again } = tile.wishing;
        tile.wishing = null;
        if (again) this.wish(tile);
      }
    }

    // -- chat over data channels ----------------------------------------------------------

    /** The channel this page sends on to the room ('') or to one participant. */
    chatOutChannel(to) {
      let channel = this.chatOut && this.chatOut.get(to);
      if (channel && channel.readyState !== 'closed' && channel.readyState !== 'closing') return channel;
      if (!this.pub || this.pub.connectionState === 'closed') return null;
      channel = this.pub.createDataChannel('chat', to ? { protocol: `to:${to}` } : {});
      channel.pending = [];
      channel.onopen = () => {
        for (const text of channel.pending.splice(0)) channel.send(text);
        if (!to) $('chat-send').disabled = false;
      };
      this.chatOut.set(to, channel);
      return channel;
    }

    /** Send one message to the room ('') or to one participant; queued until the channel opens. */
    chatSend(text, to = '') {
      const channel = this.chatOutChannel(to);
      if (!channel || !text) return false;
      const send = (payload) => {
        if (channel.readyState === 'open') channel.send(payload);
        else channel.pending.push(payload);
      };
      if (this.e2ee) {
        // encrypted in order, one after the other
        const key = this.e2ee.key;
        this.chatChain = (this.chatChain || Promise.resolve()).then(async () => {
          const iv = crypto.getRandomValues(new Uint8Array(12));
          const sealed = await crypto.subtle.encrypt(
            { name: 'AES-GCM', iv, additionalData: new TextEncoder().encode(channel.label) },
            key, new TextEncoder().encode(text));
          const payload = new Uint8Array(12 + sealed.byteLength);
          payload.set(iv);
          payload.set(new Uint8Array(sealed), 12);
          send(payload.buffer);
        }).catch((error) => notice(`chat: ${error.message}`, true));
      } else {
        send(text);
      }
      record.chatSent += 1;
      if (to) this.chatShow(this.me, to, text, true);
      else this.chatShow(this.me, '', text, false);
      return true;
    }

    /** A channel the relay opened to this page: its protocol names the sender. */
    chatChannel(channel) {
      const match = /^from:([^;]*)(;to:(.*))?$/.exec(channel.protocol || '');
      const from = match ? match[1] : '?';
      const direct = Boolean(match && match[2]);
      this.chatPeer(from);
      channel.binaryType = 'arraybuffer';
      const show = (text) => {
        record.chat.push({ from, direct, label: channel.label, text });
        if (record.chat.length > 300) record.chat.shift();
        this.chatShow(from, direct ? this.me : '', text, direct);
      };
      let chain = Promise.resolve(); // decrypted in order
      channel.onmessage = (event) => {
        const data = event.data;
        if (typeof data === 'string') {
          show(this.e2ee ? '(a message sent in the clear, not shown in an encrypted room)' : data);
          return;
        }
        if (!this.e2ee || data.byteLength < 13) {
          show(`(${data.byteLength} bytes)`);
          return;
        }
        const key = this.e2ee.key;
        chain = chain.then(async () => {
          try {
            const plain = await crypto.subtle.decrypt(
              { name: 'AES-GCM', iv: data.slice(0, 12), additionalData: new TextEncoder().encode(channel.label) },
              key, data.slice(12));
            show(new TextDecoder().decode(plain));
          } catch (error) {
            show('(a message this page cannot decrypt)');
          }
        });
      };
    }

    chatPeer(id) {
      const select = $('chat-to');
      if (!id || id === this.me || [...select.options].some((o) => o.value === id)) return;
      const option = document.createElement('option');
      option.value = id;
      option.textContent = `${id} only`;
      select.append(option);
    }

    chatShow(from, to, text, direct) {
      const log = $('chat-log');
      const item = document.createElement('li');
      if (direct) item.className = 'direct';
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = direct ? `${from} → ${to}:` : `${from}:`;
      item.append(who, document.createTextNode(text));
      log.append(item);
      while (log.children.length > 200) log.firstChild.remove();
      log.scrollTop = log.scrollHeight;
    }

    /** chat= and chatto= from the fragment (automated tests): a message a second for 30 s. */
    startChatAutomation() {
      const text = fragment.get('chat');
      if (!text) return;
      const to = fragment.get('chatto') || '';
      let n = 0;
      const timer = setInterval(() => {
        n += 1;
        if (this.ended || n > 30) {
          clearInterval(timer);
          return;
        }
        this.chatSend(`${text} #${n}`);
        if (to) this.chatSend(`${text} (to ${to}) #${n}`, to);
      }, 1000);
    }

    /** Fetch the current subscriber offer and answer it; serialised, skips stale requests. */
    negotiate(revision) {
      this.chain = this.chain.then(() => this.negotiateNow(revision)).catch((error) => {
        if (!this.ended) notice(`subscriber negotiation failed: ${error.message}`, true);
      });
      return this.chain;
    }

    async negotiateNow(revision) {
      if (this.ended || (revision !== undefined && revision <= this.applied)) return;
      for (let attempt = 0; attempt < 10; attempt++) {
        const offer = await this.api.call('POST', `${this.api.base}/subscriber`);
        await this.sub.setRemoteDescription({ type: 'offer', sdp: offer.sdp });
        this.remoteSdp = offer.sdp;
        await this.sub.setLocalDescription(await this.sub.createAnswer());
        try {
          await this.api.call('PUT', `${this.api.base}/subscriber`,
            { type: 'answer', sdp: this.sub.localDescription.sdp, revision: offer.revision });
        } catch (error) {
          if (error.status === 409) continue; // the room changed meanwhile: answer the new offer
          throw error;
        }
        this.applied = offer.revision;
        this.reconcile();
        return;
      }
      throw new Error('the subscriber offer kept changing');
    }

    /** Tiles follow the negotiated m-lines: one per msid stream (the publisher's id). */
    reconcile() {
      if (!this.sub || !this.remoteSdp) return;
      const media = describeMedia(this.remoteSdp);
      const groups = new Map();
      for (const transceiver of this.sub.getTransceivers()) {
        const info = transceiver.mid !== null && media.get(transceiver.mid);
        if (!info || !info.stream || info.stream === '-' || this.gone.has(info.stream)) continue;
        if (info.direction !== 'sendonly' && info.direction !== 'sendrecv') continue;
        const group = groups.get(info.stream) || { tracks: [], receivers: [], video: null };
        group.tracks.push(transceiver.receiver.track);
        if (info.kind === 'video' && info.track) group.video = info.track;
        group.receivers.push({ kind: info.kind, ssrc: info.ssrc, receiver: transceiver.receiver });
        if (this.e2ee) this.e2ee.label(transceiver.receiver, info.stream);
        groups.set(info.stream, group);
      }
      for (const [id, group] of groups) {
        let tile = this.tiles.get(id);
        if (!tile) {
          tile = new Tile(id, id, false);
          this.tiles.set(id, tile);
          tile.video.addEventListener('resize', () => this.wishSoon(tile)); // its aspect known
          this.inView.observe(tile.el);
          this.sizes.observe(tile.el);
        }
        tile.setTracks(group.tracks);
        if (tile.videoTrackId !== group.video) {
          // a new subscription starts with the relay's defaults
          tile.videoTrackId = group.video;
          tile.asked = { paused: false, max_width: null, max_height: null };
          this.wishSoon(tile);
        }
      }
      for (const [id, tile] of this.tiles) {
        if (id !== this.me && !groups.has(id)) this.dropTile(id);
        else if (tile) tile.setBadges(this.badgesFor(id));
      }
      this.receivers = groups;
    }

    dropTile(id) {
      const tile = this.tiles.get(id);
      if (!tile || id === this.me) return;
      this.inView.unobserve(tile.el);
      this.sizes.unobserve(tile.el);
      tile.remove();
      this.tiles.delete(id);
      this.receivers.delete(id);
    }

    badgesFor(id) {
      if (id === this.me) {
        const off = this.local.getTracks().filter((t) => !t.enabled).map((t) => (t.kind === 'audio' ? 'mic off' : 'camera off'));
        return off.length ? `· ${off.join(', ')}` : '';
      }
      return (this.muted.get(id) || new Set()).size ? '· muted' : '';
    }

    onEvent(event) {
      if (event.type !== 'stream.reconnected') {
        record.events.push({ type: event.type, participant_id: event.participant_id ?? null,
          reason: event.reason ?? null, at: performance.now() });
        if (record.events.length > MAX_EVENTS) record.events.shift();
      }
      switch (event.type) {
        case 'stream.reconnected':
          this.negotiate(); // events may have been missed: bring the tiles up to date
          break;
        case 'subscriber.renegotiate':
          if (event.participant_id === this.me) this.negotiate(event.revision);
          break;
        case 'participant.joined':
          this.gone.delete(event.participant_id);
          if (event.e2ee_required && !this.e2ee) this.needPassphrase();
          break;
        case 'participant.left':
          if (event.participant_id === this.me) {
            this.end(this.leaving || `removed from the room (${event.reason})`);
          } else {
            this.gone.add(event.participant_id);
            this.dropTile(event.participant_id);
            notice(`${event.participant_id} left (${event.reason})`);
          }
          break;
        case 'track.muted':
        case 'track.unmuted': {
          const set = this.muted.get(event.participant_id) || new Set();
          if (event.type === 'track.muted') set.add(event.track_id);
          else set.delete(event.track_id);
          this.muted.set(event.participant_id, set);
          const tile = this.tiles.get(event.participant_id);
          if (tile) tile.setBadges(this.badgesFor(event.participant_id));
          break;
        }
        case 'publisher.layers':
          if (event.participant_id === this.me) {
            this.layers = { wanted: event.wanted || [], unused: event.unused || [] };
            this.applyLayers();
          }
          break;
        case 'room.closed':
          this.end('the room was closed');
          break;
        default:
          break;
      }
    }

    toggle(kind) {
      if (!this.local) return false;
      const tracks = this.local.getTracks().filter((t) => t.kind === kind);
      const enabled = !tracks.every((t) => !t.enabled);
      for (const track of tracks) track.enabled = !enabled;
      const tile = this.tiles.get(this.me);
      if (tile) tile.setBadges(this.badgesFor(this.me));
      return enabled; // now muted
    }

    async updateStats() {
      if (this.ended) return;
      const now = performance.now();
      const inbound = {};
      let rtt = null;
      if (this.sub) rtt = await roundTrip(this.sub);
      for (const [id, group] of this.receivers) {
        const kinds = {};
        for (const { kind, ssrc, receiver } of group.receivers) {
          const report = await receiver.getStats();
          kinds[kind] = inboundSummary(report, kind, ssrc);
        }
        inbound[id] = kinds;
        const tile = this.tiles.get(id);
        if (tile) {
          const bytes = (kinds.audio?.bytesReceived || 0) + (kinds.video?.bytesReceived || 0);
          const rate = tile.bytes ? (8 * (bytes - tile.bytes.value)) / (now - tile.bytes.at) : 0;
          tile.bytes = { value: bytes, at: now };
          const lost = (kinds.audio?.packetsLost || 0) + (kinds.video?.packetsLost || 0);
          const v = kinds.video;
          const picture = v && v.frameWidth ? `${v.codec || ''} ${v.frameWidth}×${v.frameHeight} ${Math.round(v.framesPerSecond || 0)} fps\n` : '';
          tile.stats.textContent = `${picture}${Math.round(rate)} kbps · lost ${lost} · rtt ${formatRtt(rtt)}`;
        }
      }
      let outbound = null;
      if (this.pub) {
        outbound = await outboundSummary(this.pub);
        const tile = this.tiles.get(this.me);
        if (tile) {
          const bytes = outbound.bytesSent;
          const rate = this.last.out !== null ? (8 * (bytes - this.last.out)) / (now - this.last.at) : 0;
          this.last = { out: bytes, at: now };
          const v = outbound.video;
          const limited = v && v.qualityLimitationReason && v.qualityLimitationReason !== 'none'
            ? ` · limited by ${v.qualityLimitationReason}` : '';
          const picture = v && v.frameWidth ? `${v.codec || ''} ${v.frameWidth}×${v.frameHeight} ${Math.round(v.framesPerSecond || 0)} fps${limited}\n` : '';
          tile.stats.textContent = `${picture}↑ ${Math.round(rate)} kbps · lost ${outbound.packetsLost} · rtt ${formatRtt(outbound.rtt)}`;
        }
      }
      this.lastStats = { inbound, outbound, rtt };
      if (this.e2ee) this.showDecryption();
    }

    /** Frame counters for the report, and a word on the tiles whose video does not decrypt. */
    showDecryption() {
      const summary = this.e2ee.summary();
      record.e2ee = summary;
      for (const [id, tile] of this.tiles) {
        if (id === this.me) continue;
        const video = (summary.received[id] || {}).video;
        const failing = Boolean(video && video.failed > 0 && video.decrypted === 0);
        tile.placeholder.hidden = !failing && tile.tracks.some((t) => t.kind === 'video');
        if (failing) tile.placeholder.textContent = `cannot decrypt (${video.failed} frames): another passphrase?`;
      }
    }

    /** The room requires end-to-end encryption and this page has no passphrase. */
    needPassphrase() {
      if (this.ended) return;
      record.e2eeRequired = true;
      this.leave(E2EE_NEEDED).then(() => {
        record.state = 'error';
        record.error = E2EE_NEEDED;
        $('passphrase').focus();
      });
    }

    async end(reason) {
      if (this.ended) return;
      this.ended = true;
      record.state = 'left';
      clearInterval(this.timer);
      clearInterval(this.layerTimer);
      document.removeEventListener('visibilitychange', this.onVisibility);
      this.inView.disconnect();
      this.sizes.disconnect();
      if (this.events) this.events.close();
      for (const pc of [this.pub, this.sub]) if (pc) pc.close();
      if (this.e2ee) this.e2ee.close();
      if (this.local) for (const track of this.local.getTracks()) track.stop();
      for (const tile of this.tiles.values()) tile.remove();
      this.tiles.clear();
      this.receivers.clear();
      notice(reason);
      showJoinForm();
      setStatus(`Not in a call (${reason}).`);
      if (current === this) current = null;
    }

    async leave(reason = 'you left the call') {
      this.leaving = reason; // the relay's participant.left may arrive before its answer
      try {
        await this.api.call('DELETE', `${this.api.base}?reason=left`);
      } catch (error) {
        if (error.status !== 404) notice(`leave: ${error.message}`, true);
      }
      await this.end(reason);
    }

    /** Tell the relay at once when the tab goes away (instead of waiting for the timeout). */
    leaveOnUnload() {
      if (this.ended) return;
      fetch(`${this.api.base}?reason=left`, { method: 'DELETE', headers: this.api.headers(), keepalive: true })
        .catch(() => {});
    }
  }

  function onlyLoopback(description) {
    const sdp = description ? description.sdp : '';
    const addresses = [...sdp.matchAll(/^a=candidate:\S+ \d+ \S+ \d+ (\S+) /gm)].map((m) => m[1]);
    return addresses.length > 0 && addresses.every((a) => a.startsWith('127.') || a === '::1');
  }

  function formatRtt(seconds) {
    return typeof seconds === 'number' ? `${Math.round(seconds * 1000)} ms` : '–';
  }

  function codecName(report, stat) {
    const codec = stat && stat.codecId && report.get(stat.codecId);
    return codec ? codec.mimeType.split('/')[1] : null;
  }

  function inboundSummary(report, kind, ssrc) {
    let best = null;
    report.forEach((s) => {
      if (s.type !== 'inbound-rtp' || (s.kind || s.mediaType) !== kind) return;
      if (ssrc !== null && s.ssrc === ssrc) best = s;
      else if (!best || (best.ssrc !== ssrc && (s.packetsReceived || 0) > (best.packetsReceived || 0))) best = s;
    });
    if (!best) return null;
    return {
      ssrc: best.ssrc,
      codec: codecName(report, best),
      packetsReceived: best.packetsReceived || 0,
      packetsLost: best.packetsLost || 0,
      bytesReceived: best.bytesReceived || 0,
      framesDecoded: best.framesDecoded,
      frameWidth: best.frameWidth,
      frameHeight: best.frameHeight,
      framesPerSecond: best.framesPerSecond,
      jitter: best.jitter,
    };
  }

  async function outboundSummary(pc) {
    const report = await pc.getStats();
    const result = { bytesSent: 0, packetsLost: 0, rtt: null };
    const remote = [];
    report.forEach((s) => {
      if (s.type === 'outbound-rtp') {
        result.bytesSent += s.bytesSent || 0;
        result[s.kind || s.mediaType] = {
          codec: codecName(report, s),
          packetsSent: s.packetsSent || 0,
          framesEncoded: s.framesEncoded,
          frameWidth: s.frameWidth,
          frameHeight: s.frameHeight,
          framesPerSecond: s.framesPerSecond,
          targetBitrate: s.targetBitrate,
          qualityLimitationReason: s.qualityLimitationReason,
        };
      } else if (s.type === 'candidate-pair' && s.nominated && s.availableOutgoingBitrate) {
        result.availableOutgoingBitrate = s.availableOutgoingBitrate;
      } else if (s.type === 'remote-inbound-rtp') {
        result.packetsLost += s.packetsLost || 0;
        result[`${s.kind}FractionLost`] = s.fractionLost;
        if (typeof s.roundTripTime === 'number') remote.push(s.roundTripTime);
      }
    });
    result.rtt = pairRoundTrip(report) ?? (remote.length ? Math.min(...remote) : null);
    return result;
  }

  function pairRoundTrip(report) {
    let rtt = null;
    report.forEach((s) => {
      if (s.type === 'candidate-pair' && s.state === 'succeeded' && (s.nominated || s.selected) &&
          typeof s.currentRoundTripTime === 'number') {
        rtt = s.currentRoundTripTime;
      }
    });
    return rtt;
  }

  async function roundTrip(pc) {
    return pairRoundTrip(await pc.getStats());
  }

  // ------------------------------------------------------------------------------------------
  // Joining and the page's controls

  let current = null;

  function noiseStream(width, height, fps) {
    const canvas = document.createElement('canvas');
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext('2d');
    const image = context.createImageData(width, height);
    const pixels = new Uint32Array(image.data.buffer);
    let seed = 1;
    setInterval(() => {
      for (let i = 0; i < pixels.length; i += 1) {
        seed = (seed * 1103515245 + 12345) >>> 0;
        pixels[i] = 0xff000000 | (seed >>> 8);
      }
      context.putImageData(image, 0, 0);
    }, 1000 / fps);
    return canvas.captureStream(fps);
  }

  async function openCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      notice('no camera access here: browsers allow it only on https:// or http://localhost; joining receive-only', true);
      return null;
    }
    try {
      if (options.source === 'noise') {
        const stream = noiseStream(options.width, options.height, options.fps);
        const audio = await navigator.mediaDevices.getUserMedia({ audio: true });
        audio.getAudioTracks().forEach((track) => stream.addTrack(track));
        return stream;
      }
      return await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: { width: { ideal: options.width }, height: { ideal: options.height }, frameRate: { ideal: options.fps } },
      });
    } catch (error) {
      notice(`no camera or microphone (${error.name}): joining receive-only`, true);
      return null;
    }
  }

  async function join(room, recvonly, passphrase = '') {
    if (!ID.test(room)) throw new Error('a room name is 1-64 letters, digits, dots, dashes or underscores');
    $('join-button').disabled = true;
    setStatus(`Joining ${room}…`);
    record.e2eeRequired = false;
    // The camera opens, and the key is derived, while the page gets its token.
    const camera = recvonly ? Promise.resolve(null) : openCamera();
    const frameCrypto = passphrase ? FrameCrypto.create(passphrase, room) : Promise.resolve(null);
    frameCrypto.catch(() => {}); // reported below
    let call = null;
    try {
      const credentials = options.token
        ? { room_id: room, participant_id: options.participant, token: options.token }
        : await devToken(room, options.participant, !recvonly, Boolean(passphrase));
      mark('token');
      if (credentials.e2ee_required && !passphrase) {
        record.e2eeRequired = true;
        await new Api(room, credentials.participant_id, credentials.token)
          .call('DELETE', `/v1/rooms/${encodeURIComponent(room)}/participants/` +
            `${encodeURIComponent(credentials.participant_id)}?reason=left`)
          .catch(() => {});
        throw new Error(E2EE_NEEDED);
      }
      options.token = ''; // a token from the fragment is good for one participant, one join
      record.participant = credentials.participant_id;
      record.room = room;
      record.joinedAt = performance.now();
      if (!fragment.has('token')) history.replaceState(null, '', `#room=${encodeURIComponent(room)}`);
      const e2ee = await frameCrypto;
      if (e2ee) mark('key');
      showCall(room, credentials.participant_id, Boolean(e2ee));
      call = current = new Call(credentials, e2ee);
      await call.start(camera);
    } catch (error) {
      camera.then((stream) => {
        if (stream && (!call || call.local !== stream)) for (const track of stream.getTracks()) track.stop();
      });
      frameCrypto.then((e2ee) => {
        if (e2ee && !call) e2ee.close();
      }).catch(() => {});
      if (error.code === 'e2ee_required') record.e2eeRequired = true; // the relay refused to publish
      const message = record.e2eeRequired ? E2EE_NEEDED : error.message;
      if (call && record.e2eeRequired) await call.leave(`could not join: ${message}`);
      else if (call) await call.end(`could not join: ${message}`);
      else showJoinForm();
      record.state = 'error';
      record.error = message;
      notice(`could not join: ${message}`, true);
      setStatus(record.e2eeRequired ? 'Not in a call: this room is end-to-end encrypted.' : 'Not in a call.');
    } finally {
      $('join-button').disabled = false;
    }
  }

  function showCall(room, participant, e2ee) {
    $('join').hidden = true;
    $('call').hidden = false;
    $('room-label').textContent = `Room ${room} · you are ${participant}${e2ee ? ' · end-to-end encrypted' : ''}`;
    enableMute(false);
  }

  function enableMute(publishing) {
    for (const id of ['mute-audio', 'mute-video']) {
      $(id).disabled = !publishing;
      $(id).setAttribute('aria-pressed', 'false');
    }
    $('mute-audio').textContent = 'Mute mic';
    $('mute-video').textContent = 'Stop camera';
  }

  function showJoinForm() {
    $('call').hidden = true;
    $('join').hidden = false;
  }

  function setupControls() {
    $('room').value = ID.test(options.room) ? options.room : '';
    $('recvonly').checked = options.recvonly;
    $('passphrase').value = options.passphrase;
    $('join').addEventListener('submit', (event) => {
      event.preventDefault();
      join($('room').value.trim(), $('recvonly').checked, $('passphrase').value);
    });
    $('mute-audio').addEventListener('click', () => {
      const muted = current && current.toggle('audio');
      $('mute-audio').setAttribute('aria-pressed', String(Boolean(muted)));
      $('mute-audio').textContent = muted ? 'Unmute mic' : 'Mute mic';
    });
    $('mute-video').addEventListener('click', () => {
      const muted = current && current.toggle('video');
      $('mute-video').setAttribute('aria-pressed', String(Boolean(muted)));
      $('mute-video').textContent = muted ? 'Start camera' : 'Stop camera';
    });
    $('leave').addEventListener('click', () => {
      if (current) current.leave();
    });
    $('chat-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const text = $('chat-text').value;
      if (current && text && current.chatSend(text, $('chat-to').value)) $('chat-text').value = '';
    });
    window.demoChat = { send: (text, to = '') => Boolean(current && current.chatSend(text, to)) };
    window.addEventListener('pagehide', () => {
      if (current) current.leaveOnUnload();
    });
  }

  // ------------------------------------------------------------------------------------------
  // Statistics report (automated tests): the same numbers the overlay shows, every second

  function startReports() {
    if (!options.report) return;
    const capabilities = videoCodecs();
    setInterval(() => {
      const call = current;
      const payload = {
        ...record,
        userAgent: navigator.userAgent,
        now: performance.now(),
        capabilities,
        states: call ? call.states : null,
        tiles: call ? [...call.tiles.keys()].filter((id) => id !== call.me) : [],
        stats: call && call.lastStats ? call.lastStats : null,
        layers: call ? call.layerStates() : null,
      };
      fetch(options.report, { method: 'POST', mode: 'no-cors', body: JSON.stringify(payload) })
        .catch(() => {});
    }, STATS_INTERVAL_MS);
  }

  mark('script');
  setupControls();
  startReports();
  if (options.join && options.room) join(options.room, options.recvonly, options.passphrase);
  else setStatus('Not in a call. Type a room name and join.');
})();
