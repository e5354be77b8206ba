// WHIP (RFC 9725) and WHEP with fetch: one POST with this page's offer, the answer back in a
// 201 with the session's Location and ETag; PATCH for trickled candidates and ICE restarts;
// DELETE to hang up. Fragment parameters: mode=whip|whep, endpoint=URL, token=bearer token,
// report=URL (POST a JSON summary there twice a second: automated tests), restart=SECONDS
// (restart ICE through PATCH that long after media flows), width, height, fps.
'use strict';
(() => {
  const params = new URLSearchParams(location.hash.slice(1));
  const mode = params.get('mode') === 'whep' ? 'whep' : 'whip';
  const endpoint = params.get('endpoint');
  const token = params.get('token');
  const reportUrl = params.get('report');
  const restartAfter = Number(params.get('restart') || 0);
  const record = { mode, state: 'starting', error: null, log: [] };
  const statusLine = document.getElementById('status');
  const video = document.getElementById('video');
  let pc = null;
  let sessionUrl = null;
  let etag = null;
  let answerSdp = null;

  function note(text) {
    record.log.push(`${Math.round(performance.now())} ${text}`);
    statusLine.textContent = text;
  }

  function headers(type, extra) {
    const h = { ...(extra || {}) };
    if (type) h['Content-Type'] = type;
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  function attribute(sdp, name) {
    const match = new RegExp(`^a=${name}:(.*)$`, 'm').exec(sdp);
    return match ? match[1].trim() : null;
  }

  async function post(offer) {
    record.postedAt = Date.now();
    record.postedPerf = performance.now();
    const response = await fetch(endpoint, {
      method: 'POST',
      headers: headers('application/sdp'),
      body: offer,
    });
    record.postStatus = response.status;
    const body = await response.text();
    if (response.status !== 201) throw new Error(`POST answered ${response.status}: ${body}`);
    sessionUrl = new URL(response.headers.get('Location'), endpoint).href;
    etag = response.headers.get('ETag');
    Object.assign(record, { location: sessionUrl, etag, link: response.headers.get('Link') });
    record.answeredPerf = performance.now();
    return body;
  }

  // The first m-section's transport: what a PATCH fragment carries under max-bundle.
  function fragment(sdp, withCandidates) {
    const lines = sdp.split(/\r?\n/);
    const first = lines.findIndex((l) => l.startsWith('m='));
    const next = lines.findIndex((l, i) => i > first && l.startsWith('m='));
    const section = lines.slice(first, next < 0 ? undefined : next);
    const out = [`a=ice-ufrag:${attribute(sdp, 'ice-ufrag')}`, `a=ice-pwd:${attribute(sdp, 'ice-pwd')}`];
    out.push(lines[first]);
    out.push(...section.filter((l) => l.startsWith('a=mid:')));
    if (withCandidates) out.push(...section.filter((l) => l.startsWith('a=candidate:')));
    return `${out.join('\r\n')}\r\n`;
  }

  async function trickle() {
    // what a trickling client sends once it has candidates; the ICE-lite relay needs none
    await new Promise((resolve) => setTimeout(resolve, 300));
    const response = await fetch(sessionUrl, {
      method: 'PATCH',
      headers: headers('application/trickle-ice-sdpfrag', { 'If-Match': etag }),
      body: fragment(pc.localDescription.sdp, true),
    });
    record.trickleStatus = response.status;
    const stale = await fetch(sessionUrl, {
      method: 'PATCH',
      headers: headers('application/trickle-ice-sdpfrag', { 'If-Match': '"stale"' }),
      body: fragment(pc.localDescription.sdp, true),
    });
    record.staleStatus = stale.status;
  }

  async function restartIce() {
    note('restarting ICE');
    const offer = await pc.createOffer({ iceRestart: true });
    await pc.setLocalDescription(offer);
    record.restartPerf = performance.now();
    record.restartUfrag = attribute(offer.sdp, 'ice-ufrag');
    const response = await fetch(sessionUrl, {
      method: 'PATCH',
      headers: headers('application/trickle-ice-sdpfrag', { 'If-Match': '*' }),
      body: fragment(offer.sdp, false),
    });
    record.restartStatus = response.status;
    const body = await response.text();
    if (response.status !== 200) throw new Error(`ICE restart answered ${response.status}: ${body}`);
    etag = response.headers.get('ETag');
    record.restartEtag = etag;
    const ufrag = attribute(body, 'ice-ufrag');
    const pwd = attribute(body, 'ice-pwd');
    answerSdp = answerSdp
      .replace(/^a=ice-ufrag:.*$/gm, `a=ice-ufrag:${ufrag}`)
      .replace(/^a=ice-pwd:.*$/gm, `a=ice-pwd:${pwd}`);
    await pc.setRemoteDescription({ type: 'answer', sdp: answerSdp });
    record.restarted = true;
    note('ICE restarted');
  }

  async function hangUp() {
    if (!sessionUrl) return;
    const response = await fetch(sessionUrl, { method: 'DELETE', headers: headers(null) });
    record.deleteStatus = response.status;
    pc.close();
    note('hung up');
  }

  const canvas = document.createElement('canvas');
  canvas.width = 32;
  canvas.height = 24;

  function meanColour() {
    if (!video.videoWidth) return null;
    const context = canvas.getContext('2d', { willReadFrequently: true });
    context.drawImage(video, 0, 0, canvas.width, canvas.height);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < data.length; i += 4) for (let c = 0; c < 3; c += 1) sum[c] += data[i + c];
    return sum.map((v) => Math.round(v / (data.length / 4)));
  }

  async function stats() {
    if (!pc) return;
    const summary = { inbound: {}, outbound: {} };
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') {
        summary.inbound[s.kind] = {
          packets: s.packetsReceived,
          framesDecoded: s.framesDecoded,
          width: s.frameWidth,
          height: s.frameHeight,
          energy: s.totalAudioEnergy,
        };
      } else if (s.type === 'transport') {
        summary.transport = {
          localUfrag: s.iceLocalUsernameFragment,
          pairChanges: s.selectedCandidatePairChanges,
          iceState: s.iceState,
          dtlsState: s.dtlsState,
        };
      } else if (s.type === 'outbound-rtp') {
        const previous = summary.outbound[s.kind];
        summary.outbound[s.kind] = { packets: (previous ? previous.packets : 0) + s.packetsSent };
      }
    });
    record.stats = summary;
    const decoded = summary.inbound.video && summary.inbound.video.framesDecoded;
    if (decoded && record.firstFramePerf === undefined) {
      record.firstFramePerf = performance.now();
      record.firstFrameMs = record.firstFramePerf - record.postedPerf;
    }
    record.colour = meanColour();
    record.connection = pc.connectionState;
    record.ice = pc.iceConnectionState;
  }

  async function start() {
    if (!endpoint) throw new Error('no endpoint in the URL fragment');
    pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    if (mode === 'whip') {
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: {
          width: Number(params.get('width') || 320),
          height: Number(params.get('height') || 240),
          frameRate: Number(params.get('fps') || 15),
        },
      });
      video.srcObject = stream;
      for (const track of stream.getTracks()) {
        pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
      }
    } else {
      pc.addTransceiver('audio', { direction: 'recvonly' });
      pc.addTransceiver('video', { direction: 'recvonly' });
      const remote = new MediaStream();
      pc.ontrack = (event) => {
        remote.addTrack(event.track);
        video.srcObject = remote;
        video.play().catch(() => {});
      };
    }
    await pc.setLocalDescription(await pc.createOffer());
    answerSdp = await post(pc.localDescription.sdp);
    await pc.setRemoteDescription({ type: 'answer', sdp: answerSdp });
    record.state = 'answered';
    note(`${mode.toUpperCase()} session ${sessionUrl}`);
    await trickle();
    if (restartAfter > 0) {
      const flowing = () => {
        const s = record.stats || {};
        const side = mode === 'whip' ? s.outbound : s.inbound;
        return side && side.video && side.video.packets > 0;
      };
      while (!flowing()) await new Promise((resolve) => setTimeout(resolve, 100));
      await new Promise((resolve) => setTimeout(resolve, restartAfter * 1000));
      await restartIce();
    }
  }

  document.getElementById('hangup').addEventListener('click', () => {
    hangUp().catch((e) => { record.error = String(e); });
  });
  setInterval(() => {
    stats().catch(() => {});
  }, 100);
  if (reportUrl) {
    setInterval(() => {
      const payload = { ...record, now: performance.now() };
      fetch(reportUrl, { method: 'POST', mode: 'no-cors', body: JSON.stringify(payload) })
        .catch(() => {});
    }, 500);
  }
  start().catch((e) => {
    record.state = 'error';
    record.error = String(e);
    note(`error: ${e}`);
  });
})();
