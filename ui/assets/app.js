// Skiff's dashboard: hash routes (#/map, #/services, #/services/NAME,
// #/events, #/nodes), one event stream (/api/events, resumed by the browser
// with Last-Event-ID), and on each event one debounced refetch of what the
// page shows: no polling per widget.
'use strict';

const state = {
  overview: null,     // GET /api/overview
  service: null,      // GET /api/services/NAME on a service page
  events: [],         // the latest events, oldest first
  source: null,       // the EventSource
  timer: null,        // the pending refetch
  fetching: false,
  again: false,
  filter: { service: '', node: '' },
  logs: null,         // the replica logs shown on a service page
  lastSeq: 0,         // the newest event's sequence number
  traffic: null,      // { service, samples, source } on a service page
};
/// The charts' span: the last five minutes of the 2-second samples.
const TRAFFIC_SPAN_MS = 5 * 60 * 1000;
const MAX_EVENTS = 500;
const DEBOUNCE_MS = 80;

const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const time = (ms) => ms ? new Date(ms).toLocaleTimeString() : '';

class Unauthorized extends Error {}

async function api(method, path, body) {
  const options = { method, headers: { 'X-Skiff-UI': '1' }, credentials: 'same-origin' };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    showLogin(data.error);
    throw new Unauthorized(data.error || 'log in first');
  }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function toast(text) {
  $('toast').textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { $('toast').textContent = ''; }, 6000);
}

// ---- login -------------------------------------------------------------

function showLogin(message) {
  stopStream();
  $('login').hidden = false;
  $('view').hidden = true;
  $('logout').hidden = true;
  $('login-error').textContent = message && !/no API token/.test(message) ? message : '';
  $('token').focus();
}

async function login(event) {
  event.preventDefault();
  try {
    await api('POST', '/login', { token: $('token').value });
    $('token').value = '';
    start();
  } catch (e) {
    $('login-error').textContent = e.message;
  }
}

async function logout() {
  await api('POST', '/logout').catch(() => {});
  showLogin();
}

// ---- live updates ------------------------------------------------------

function stopStream() {
  stopTraffic();
  if (state.source) state.source.close();
  state.source = null;
  $('live').textContent = 'offline';
  $('live').classList.remove('on');
}

function startStream() {
  stopStream();
  // The browser resumes by itself (Last-Event-ID); a new stream resumes from here.
  const source = new EventSource('/api/events' + (state.lastSeq ? `?after=${state.lastSeq}` : ''));
  state.source = source;
  source.addEventListener('open', () => {
    $('live').textContent = 'live';
    $('live').classList.add('on');
    refreshSoon();
  });
  source.addEventListener('skiff', (message) => {
    const event = JSON.parse(message.data);
    state.lastSeq = Math.max(state.lastSeq, event.seq);
    state.events.push(event);
    if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
    if (page().name === 'events') renderEvents();
    refreshSoon();
  });
  source.addEventListener('failure', (message) => {
    toast('event stream: ' + JSON.parse(message.data).error);
  });
  source.addEventListener('error', () => {
    $('live').textContent = 'reconnecting';
    $('live').classList.remove('on');
    // A refused stream is closed for good: ask whether we are still logged
    // in (a 401 shows the login form), and if so open another.
    if (source.readyState === EventSource.CLOSED && state.source === source) {
      refresh().then(() => setTimeout(() => { if (state.source === source) startStream(); }, 1000),
        () => {});
    }
  });
}

function refreshSoon() {
  if (state.timer) return;
  state.timer = setTimeout(() => { state.timer = null; refresh().catch(() => {}); }, DEBOUNCE_MS);
}

async function refresh() {
  if (state.frozen) return;
  if (state.fetching) { state.again = true; return; }
  state.fetching = true;
  try {
    const p = page();
    const [overview, service] = await Promise.all([
      api('GET', '/api/overview'),
      p.name === 'service' ? api('GET', '/api/services/' + encodeURIComponent(p.arg)).catch((e) => {
        if (e instanceof Unauthorized) throw e;
        return { error: e.message };
      }) : null,
    ]);
    state.overview = overview;
    state.service = service;
    render();
  } finally {
    state.fetching = false;
    if (state.again) { state.again = false; refreshSoon(); }
  }
}

// ---- pages -------------------------------------------------------------

function page() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (parts[0] === 'services' && parts[1]) return { name: 'service', arg: parts[1] };
  if (['map', 'services', 'events', 'nodes'].includes(parts[0])) return { name: parts[0] };
  return { name: 'map' };
}

function render() {
  const p = page();
  for (const link of document.querySelectorAll('nav a')) {
    const current = link.dataset.page === p.name || (p.name === 'service' && link.dataset.page === 'services');
    if (current) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  if (!state.overview) return;
  syncTraffic(p);
  const view = $('view');
  // Live re-renders replace the page's HTML: keep the keyboard focus where it was.
  const focused = focusSelector(document.activeElement);
  if (p.name === 'map') view.innerHTML = mapHtml(state.overview);
  else if (p.name === 'services') view.innerHTML = servicesHtml(state.overview);
  else if (p.name === 'service') view.innerHTML = serviceHtml(state.service, p.arg);
  else if (p.name === 'nodes') view.innerHTML = nodesHtml(state.overview);
  else if (p.name === 'events') { if (!$('events-page')) view.innerHTML = eventsShellHtml(); renderEvents(); }
  view.dataset.page = p.name;
  if (focused && !view.contains(document.activeElement)) {
    const again = view.querySelector(focused);
    if (again) again.focus();
  }
}

/// A selector that finds `element` again after a re-render, if it is one of the page's controls.
function focusSelector(element) {
  if (!element || !$('view').contains(element)) return null;
  for (const key of ['action', 'logs', 'nodeAction', 'alloc']) {
    if (element.dataset[key] !== undefined) {
      const attribute = 'data-' + key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
      const node = element.dataset.node ? `[data-node="${CSS.escape(element.dataset.node)}"]` : '';
      return `${element.tagName.toLowerCase()}[${attribute}="${CSS.escape(element.dataset[key])}"]${node}`;
    }
  }
  return element.id ? '#' + CSS.escape(element.id) : null;
}

function versionClass(version) { return 'v' + (Number(version) % 6); }

function blockHtml(r) {
  const leaving = r.desired !== 'run' ? ' leaving' : '';
  const label = `${r.service} replica ${r.slot} on ${r.node}: ${r.state}, version ${r.version}${leaving ? ', stopping' : ''}`;
  return `<a class="block st-${esc(r.state)} ${versionClass(r.version)}${leaving}" href="#/services/${encodeURIComponent(r.service)}"` +
    ` data-service="${esc(r.service)}" data-node="${esc(r.node)}" data-state="${esc(r.state)}" data-version="${esc(r.version)}"` +
    ` data-alloc="${esc(r.id)}" title="${esc(label)}" aria-label="${esc(label)}">v${esc(r.version)}</a>`;
}

function meterHtml(label, used, total, unit) {
  if (!total) return `<span>${label}</span><span class="muted">not counted</span><span></span>`;
  return `<span>${label}</span><meter min="0" max="${total}" value="${Math.min(used, total)}" high="${total * 0.85}"` +
    ` aria-label="${label} ${used} of ${total} ${unit}"></meter><span>${used}/${total}${unit}</span>`;
}

function serversHtml(cluster) {
  const members = cluster.members.map((m) =>
    `<span class="server${m.role === 'leader' ? ' leader' : ''}" data-server="${esc(m.name)}">${esc(m.name)} · ${esc(m.role)}` +
    `${m.reachable && m.reachable !== 'yes' ? ' · reachable: ' + esc(m.reachable) : ''}</span>`).join('');
  return `<div class="servers" aria-label="Servers"><strong>Servers</strong>${members}` +
    `<span class="muted">leader ${esc(cluster.leader || 'none')} · term ${cluster.term} · commit ${cluster.commit_index}</span></div>`;
}

/// What the first screen must answer: deployments in flight or failed, and replicas that fail.
function attentionHtml(o) {
  const items = [];
  for (const s of o.services) {
    const d = s.deployment;
    if (d && !['succeeded', 'superseded'].includes(d.status) && !(d.status === 'rolled-back' && d.ended_ms)) {
      items.push(`<li class="deploy-${esc(d.status)}"><a href="#/services/${encodeURIComponent(s.name)}">${esc(s.name)}</a> ` +
        `deployment v${d.version} ${esc(d.status)}: ${d.new_healthy}/${d.desired} new healthy${d.message ? ' · ' + esc(d.message) : ''}</li>`);
    }
    for (const r of s.replicas) {
      if (r.desired === 'run' && ['failed', 'unhealthy', 'restarting', 'exited', 'unknown'].includes(r.state)) {
        items.push(`<li class="error"><a href="#/services/${encodeURIComponent(s.name)}">${esc(s.name)}</a> replica ${r.slot} on ` +
          `${esc(r.node)} ${esc(r.state)}${r.message ? ': ' + esc(r.message) : ''} (its logs are on the service page)</li>`);
      }
    }
  }
  if (!items.length) return '<p id="attention" class="muted">Every deployment is done and every replica is well.</p>';
  return `<section id="attention" aria-label="Needs attention"><h2>Needs attention</h2><ul>${items.slice(0, 20).join('')}</ul></section>`;
}

function mapHtml(o) {
  const byNode = new Map(o.nodes.map((n) => [n.name, []]));
  for (const s of o.services) for (const r of s.replicas) {
    if (!byNode.has(r.node)) byNode.set(r.node, []);
    byNode.get(r.node).push(r);
  }
  const nodes = [...byNode.entries()].map(([name, replicas]) => {
    const n = o.nodes.find((x) => x.name === name) || { name, status: 'unknown', availability: '' };
    replicas.sort((a, b) => a.service < b.service ? -1 : a.service > b.service ? 1 : a.slot - b.slot);
    return `<section class="node ${esc(n.status)} ${esc(n.availability)}" data-node="${esc(name)}" aria-label="Node ${esc(name)}">` +
      `<h3><span>${esc(name)}</span><span class="muted">${esc(n.status)}${n.availability && n.availability !== 'active' ? ' · ' + esc(n.availability) : ''}</span></h3>` +
      `<div class="bars">${meterHtml('CPU', n.cpu_used, n.cpu_millis, 'm')}${meterHtml('Memory', n.memory_used, n.memory_mb, 'MB')}` +
      `${meterHtml('Ports', n.ports_used, n.ports, '')}</div>` +
      `<div class="blocks">${replicas.map(blockHtml).join('')}</div></section>`;
  }).join('');
  const total = o.services.reduce((sum, s) => sum + s.replicas.length, 0);
  return `<h1>Cluster map</h1>${serversHtml(o.cluster)}${attentionHtml(o)}` +
    `<div class="legend" aria-hidden="true">State: <span class="block st-healthy">ok</span>healthy <span class="block st-running">run</span>running` +
    ` <span class="block st-starting">…</span>starting <span class="block st-unhealthy">!</span>unhealthy <span class="block st-failed">×</span>failed` +
    ` <span class="block st-stopping leaving">–</span>stopping; the border's colour is the version.</div>` +
    `<p class="muted" id="map-summary">${o.nodes.length} nodes, ${total} replicas of ${o.services.length} services</p>` +
    `<div class="nodes">${nodes}</div>`;
}

function ports(s) {
  if (s.publish) return `${s.publish} → ${s.port || 'image port'} (${esc(s.protocol)})`;
  return s.port ? `${s.port}, not published` : 'not published';
}

function deploymentCell(d) {
  if (!d) return '<span class="muted">none</span>';
  return `v${d.version} ${esc(d.status)}${d.status === 'running' ? ` (${d.new_healthy}/${d.desired})` : ''}`;
}

function servicesHtml(o) {
  const rows = o.services.map((s) => `<tr data-service="${esc(s.name)}">` +
    `<td><a href="#/services/${encodeURIComponent(s.name)}">${esc(s.name)}</a></td><td>${esc(s.image)}</td>` +
    `<td class="counts">${s.desired} / ${s.running} / ${s.healthy}</td><td>${ports(s)}</td><td>${esc(s.strategy)}</td>` +
    `<td>v${s.version}</td><td>${deploymentCell(s.deployment)}</td></tr>`).join('');
  return `<h1>Services</h1><div class="table-wrap"><table><caption class="muted">Desired / running / healthy replicas</caption>` +
    `<thead><tr><th scope="col">Service</th><th scope="col">Image or command</th><th scope="col">Desired / running / healthy</th>` +
    `<th scope="col">Ports</th><th scope="col">Strategy</th><th scope="col">Version</th><th scope="col">Deployment</th></tr></thead>` +
    `<tbody>${rows || '<tr><td colspan="7">No services yet: <code>skiff service create</code>.</td></tr>'}</tbody></table></div>`;
}

function deploymentHtml(d) {
  if (!d) return '<p class="muted">No deployment has run.</p>';
  const canary = d.strategy === 'canary'
    ? `<p>Canaries: ${d.canary || 1}; weight ${d.canary_weight ? d.canary_weight + '%' : 'proportional'}; max error rate ${d.max_error_rate ?? 'not gated'}${d.max_error_rate != null ? '%' : ''}</p>` : '';
  return `<div class="deployment" id="deployment" data-status="${esc(d.status)}" data-version="${d.version}">` +
    `<p><strong>Version ${d.version}</strong> from ${d.from_version} · ${esc(d.strategy)} · <span class="status">${esc(d.status)}</span>` +
    `${d.promoted ? ' · promoted' : ''}</p>` +
    `<label for="progress">New version healthy: ${d.new_healthy} of ${d.desired} (placed ${d.new_placed}; old still running ${d.old_running})</label>` +
    `<progress id="progress" max="${Math.max(d.desired, 1)}" value="${d.new_healthy}"></progress>` +
    `${canary}<p class="muted">${esc(d.message)}</p></div>`;
}

function serviceHtml(s, name) {
  if (!s) return `<h1>${esc(name)}</h1><p>Loading…</p>`;
  if (s.error) return `<h1>${esc(name)}</h1><p class="error">${esc(s.error)}</p>`;
  const d = s.deployment;
  const active = d && ['running', 'paused', 'awaiting-promotion'].includes(d.status);
  const replicas = s.replicas.slice().sort((a, b) => a.slot - b.slot || a.version - b.version).map((r) => `<tr data-alloc="${esc(r.id)}" data-state="${esc(r.state)}" data-version="${r.version}">` +
    `<td>${r.slot}</td><td><code>${esc(r.id.slice(0, 8))}</code></td><td>${esc(r.node)}</td><td>${blockHtml(r)} ${esc(r.state)}${r.desired !== 'run' ? ' (stopping)' : ''}</td>` +
    `<td>${esc(r.image)}</td><td>${r.host_port || ''}</td><td>${r.restarts}</td><td>${esc(r.message)}</td>` +
    `<td><button type="button" data-logs="${esc(r.id)}" aria-label="Last log lines of replica ${r.slot} (${esc(r.id.slice(0, 8))})">Logs</button></td></tr>`).join('');
  const history = s.history.slice().reverse().map((v) => `<tr><td>v${v.version}</td><td>${esc(v.image)}</td>` +
    `<td>${esc(v.outcome)}</td><td>${time(v.created_ms)}</td><td>${esc((v.diff || []).join('; ') || v.message)}</td></tr>`).join('');
  const events = s.events.slice(-30).reverse().map(eventHtml).join('');
  return `<h1>Service ${esc(s.name)}</h1>` +
    `<p>${esc(s.image)} · ${esc(s.mode)} · ${ports(s)} · ${esc(s.strategy)} · <span id="counts">desired ${s.desired}, running ${s.running}, healthy ${s.healthy}</span></p>` +
    (s.unplaced_reason ? `<p class="error">${esc(s.unplaced_reason)}</p>` : '') +
    `<div class="actions" role="group" aria-label="Actions">` +
    `<button type="button" data-action="scale" data-arg="${s.desired}">Scale…</button>` +
    `<button type="button" data-action="image" data-arg="${esc(s.image)}">Update image…</button>` +
    `<button type="button" data-action="promote" ${d && d.status === 'awaiting-promotion' ? '' : 'disabled'}>Promote</button>` +
    (d && d.status === 'paused'
      ? `<button type="button" data-action="resume">Resume</button>`
      : `<button type="button" data-action="pause" ${active ? '' : 'disabled'}>Pause</button>`) +
    `<button type="button" class="danger" data-action="rollback" ${s.history.length > 1 ? '' : 'disabled'}>Roll back</button></div>` +
    `<h2>Deployment</h2>${deploymentHtml(d)}` +
    `<h2>Traffic</h2><div id="traffic" class="charts">${trafficHtml(state.traffic, s)}</div>` +
    `<h2>Autoscaling</h2>${scalingHtml(s)}` +
    `<h2>Replicas</h2><div class="table-wrap"><table><thead><tr><th scope="col">#</th><th scope="col">Id</th><th scope="col">Node</th>` +
    `<th scope="col">State</th><th scope="col">Image</th><th scope="col">Port</th><th scope="col">Restarts</th><th scope="col">Last message</th>` +
    `<th scope="col">Logs</th></tr></thead><tbody>${replicas}</tbody></table></div>` +
    `<section id="logs" aria-live="polite">${logsHtml(state.logs)}</section>` +
    `<h2>Versions</h2><div class="table-wrap"><table><thead><tr><th scope="col">Version</th><th scope="col">Image</th><th scope="col">Outcome</th>` +
    `<th scope="col">Created</th><th scope="col">Change</th></tr></thead><tbody>${history}</tbody></table></div>` +
    `<h2>Latest events</h2><ul class="events">${events}</ul>`;
}

// ---- traffic charts and autoscaling ------------------------------------

/// One stream per page of a published service (/api/services/NAME/traffic): a
/// sample every 2 s. Opened once the service is known to be published.
function syncTraffic(p) {
  const s = state.service;
  const wanted = p.name === 'service' && s && !s.error && s.name === p.arg && s.publish ? p.arg : null;
  if (!wanted && p.name === 'service' && state.traffic && state.traffic.service === p.arg && !s) return;
  if (state.traffic && state.traffic.service === wanted) return;
  stopTraffic();
  if (!wanted) return;
  const source = new EventSource(`/api/services/${encodeURIComponent(wanted)}/traffic`);
  const traffic = { service: wanted, samples: [], source };
  state.traffic = traffic;
  source.addEventListener('sample', (message) => {
    const sample = JSON.parse(message.data);
    traffic.samples.push(sample);
    const oldest = sample.time_ms - TRAFFIC_SPAN_MS;
    while (traffic.samples.length && traffic.samples[0].time_ms < oldest) traffic.samples.shift();
    const box = $('traffic');
    if (box && state.traffic === traffic) box.innerHTML = trafficHtml(traffic, state.service);
  });
  source.addEventListener('failure', (message) => {
    toast('traffic: ' + JSON.parse(message.data).error);
  });
}

function stopTraffic() {
  if (state.traffic) state.traffic.source.close();
  state.traffic = null;
}

const fmt = (v, digits) => (v == null ? '–' : Number(v).toFixed(digits));

/// A hand-drawn SVG line chart of `key` over the samples' five minutes;
/// `limit` draws a dashed line (the --max-error-rate gate).
function chartSvg(samples, key, unit, limit, id) {
  const W = 360, H = 140, L = 44, R = 8, T = 10, B = 22;
  const w = W - L - R, h = H - T - B;
  const end = samples.length ? samples[samples.length - 1].time_ms : Date.now();
  const start = end - TRAFFIC_SPAN_MS;
  const values = samples.map((x) => x[key]).filter((v) => v != null);
  let top = Math.max(key === 'error_rate' ? 5 : 1, ...values, limit != null ? limit * 1.25 : 0);
  top = Math.ceil(top * 1.1 * 100) / 100;
  const x = (t) => (L + ((t - start) / TRAFFIC_SPAN_MS) * w).toFixed(1);
  const y = (v) => (T + h - (v / top) * h).toFixed(1);
  // A missing value (no response in an interval) breaks the line.
  const lines = [];
  let points = [];
  for (const sample of samples) {
    const v = sample[key];
    if (v == null) { if (points.length) lines.push(points); points = []; continue; }
    points.push(`${x(sample.time_ms)},${y(v)}`);
  }
  if (points.length) lines.push(points);
  const paths = lines.map((p) => p.length === 1
    ? `<circle class="dot" cx="${p[0].split(',')[0]}" cy="${p[0].split(',')[1]}" r="2.5"/>`
    : `<polyline class="line" points="${p.join(' ')}"/>`).join('');
  const grid = [0, top / 2, top].map((v) => `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>` +
    `<text class="tick" x="${L - 4}" y="${Number(y(v)) + 4}" text-anchor="end">${fmt(v, top < 10 ? 1 : 0)}${unit}</text>`).join('');
  const gate = limit != null
    ? `<line class="limit" x1="${L}" x2="${W - R}" y1="${y(limit)}" y2="${y(limit)}"/>` +
      `<text class="limit-label" x="${W - R - 2}" y="${Number(y(limit)) - 4}" text-anchor="end">max ${limit}%</text>` : '';
  return `<svg viewBox="0 0 ${W} ${H}" role="img" aria-labelledby="${id}-caption ${id}-summary" focusable="false">` +
    `${grid}${gate}<text class="tick" x="${L}" y="${H - 6}">−5 min</text>` +
    `<text class="tick" x="${W - R}" y="${H - 6}" text-anchor="end">now</text>${paths}</svg>`;
}

function trafficHtml(traffic, s) {
  if (!s || s.error) return '';
  if (!s.publish) return '<p class="muted">Not published: no routing proxy reports its traffic.</p>';
  const samples = traffic && traffic.service === s.name ? traffic.samples : [];
  const last = samples[samples.length - 1];
  const gate = last ? last.max_error_rate : (s.deployment ? s.deployment.max_error_rate : null);
  const rates = samples.map((x) => x.request_rate);
  const peak = rates.length ? Math.max(...rates) : 0;
  const errors = samples.filter((x) => x.error_rate != null);
  const lastError = errors.length ? errors[errors.length - 1] : null;
  const rps = last ? last.request_rate : 0;
  const rpsSummary = last
    ? `Now ${fmt(rps, 1)} requests/s (peak ${fmt(peak, 1)} over the last 5 minutes); ${last.active} connections open` +
      `${last.no_endpoint ? `; ${last.no_endpoint} refused for want of a replica` : ''}` +
      `${last.connect_failures ? `; ${last.connect_failures} failed dials` : ''}.`
    : 'Waiting for the routing proxies’ first report…';
  const errSummary = lastError
    ? `Now ${fmt(lastError.error_rate, 1)}% of responses were 5xx (${lastError.errors} of ${lastError.responses} in 2 s)` +
      `${gate != null ? `; the deployment's limit is ${gate}%` : ''}.`
    : `No HTTP responses yet${gate != null ? `; the deployment's limit is ${gate}%` : ''}.`;
  return `<figure class="chart" id="chart-rps" data-latest="${fmt(rps, 2)}" data-samples="${samples.length}">` +
    `<figcaption id="chart-rps-caption">Requests per second</figcaption>` +
    chartSvg(samples, 'request_rate', '', null, 'chart-rps') +
    `<p class="summary" id="chart-rps-summary" aria-live="off">${esc(rpsSummary)}</p></figure>` +
    `<figure class="chart" id="chart-errors" data-latest="${lastError ? fmt(lastError.error_rate, 2) : ''}"` +
    ` data-limit="${gate ?? ''}"><figcaption id="chart-errors-caption">Error rate (HTTP 5xx, % of responses)</figcaption>` +
    chartSvg(samples, 'error_rate', '%', gate, 'chart-errors') +
    `<p class="summary" id="chart-errors-summary" aria-live="off">${esc(errSummary)}</p></figure>`;
}

function scalingHtml(s) {
  const a = s.autoscale;
  const targets = a ? [a.target_rps ? `${a.target_rps} req/s` : '', a.target_concurrency ? `${a.target_concurrency} connections` : '',
    a.target_cpu ? `${a.target_cpu}% CPU` : ''].filter(Boolean).join(', ') : '';
  const policy = a
    ? `<p>Autoscaled between ${a.min} and ${a.max} replicas${targets ? `, per replica targets: ${esc(targets)}` : ''}.</p>`
    : '<p class="muted">Not autoscaled; scale changes made by operators are listed.</p>';
  const items = (s.scaling || []).slice().reverse().map((d) => `<li data-from="${d.from}" data-to="${d.to}" data-automatic="${d.automatic}">` +
    `<time datetime="${new Date(d.time_ms).toISOString()}">${time(d.time_ms)}</time> ` +
    `<strong>${d.from} → ${d.to}</strong> replicas${d.automatic ? ' (autoscaler)' : ''}: ${esc(d.reason)}</li>`).join('');
  return policy + (items ? `<ul class="events" id="scaling">${items}</ul>` : '<p class="muted" id="scaling">No scale decisions yet.</p>');
}

function logsHtml(logs) {
  if (!logs || logs.service !== page().arg) return '';
  return `<h2>Last lines of replica <code>${esc(logs.replica.slice(0, 8))}</code></h2>` +
    `<pre class="logs" tabindex="0">${esc(logs.text || '(no output yet)')}</pre>`;
}

async function showLogs(replica) {
  const service = page().arg;
  try {
    const logs = await api('GET', `/api/services/${encodeURIComponent(service)}/logs?replica=${encodeURIComponent(replica)}&tail=50`);
    state.logs = { service, replica, text: logs.text };
    $('logs').innerHTML = logsHtml(state.logs);
    $('logs').scrollIntoView({ block: 'nearest' });
  } catch (e) { if (!(e instanceof Unauthorized)) toast(`logs: ${e.message}`); }
}

function nodesHtml(o) {
  const rows = o.nodes.map((n) => `<tr data-node="${esc(n.name)}"><td>${esc(n.name)}</td><td>${esc(n.address)}</td>` +
    `<td>${esc(n.status)}</td><td class="availability">${esc(n.availability)}${n.drained ? ' (drained)' : ''}</td>` +
    `<td><div class="bars">${meterHtml('CPU', n.cpu_used, n.cpu_millis, 'm')}${meterHtml('Memory', n.memory_used, n.memory_mb, 'MB')}</div></td>` +
    `<td>${n.allocations}</td><td><div class="actions">` +
    ['active', 'pause', 'drain'].map((a) => `<button type="button" data-node-action="${a}" data-node="${esc(n.name)}" ${n.availability === a ? 'disabled' : ''}` +
      ` aria-label="${a === 'active' ? 'Activate' : a === 'pause' ? 'Pause' : 'Drain'} node ${esc(n.name)}">${a === 'active' ? 'Activate' : a === 'pause' ? 'Pause' : 'Drain'}</button>`).join('') +
    `</div></td></tr>`).join('');
  return `<h1>Nodes</h1><div class="table-wrap"><table><thead><tr><th scope="col">Node</th><th scope="col">Address</th><th scope="col">Status</th>` +
    `<th scope="col">Availability</th><th scope="col">Capacity</th><th scope="col">Replicas</th><th scope="col">Actions</th></tr></thead>` +
    `<tbody>${rows}</tbody></table></div>`;
}

function eventHtml(e) {
  return `<li data-seq="${e.seq}" data-service="${esc(e.service)}" data-node="${esc(e.node)}"><span class="muted">${time(e.time_ms)}</span> ` +
    `<span class="kind">${esc(e.kind)}</span> ${e.service ? esc(e.service) : ''}${e.node ? ' on ' + esc(e.node) : ''} ${esc(e.message)}` +
    `${e.by ? ` <span class="muted">by ${esc(e.by)}</span>` : ''}</li>`;
}

function eventsShellHtml() {
  return `<div id="events-page"><h1>Events</h1><form class="filters" id="event-filters" role="search">` +
    `<label for="filter-service">Service</label><input id="filter-service" list="service-names" autocomplete="off">` +
    `<label for="filter-node">Node</label><input id="filter-node" list="node-names" autocomplete="off">` +
    `<datalist id="service-names"></datalist><datalist id="node-names"></datalist></form>` +
    `<ul class="events" id="event-list" aria-live="polite" aria-relevant="additions"></ul></div>`;
}

function renderEvents() {
  const list = $('event-list');
  if (!list) return;
  if (state.overview) {
    $('service-names').innerHTML = state.overview.services.map((s) => `<option value="${esc(s.name)}">`).join('');
    $('node-names').innerHTML = state.overview.nodes.map((n) => `<option value="${esc(n.name)}">`).join('');
  }
  const { service, node } = state.filter;
  const shown = state.events.filter((e) => (!service || e.service === service) && (!node || e.node === node));
  list.innerHTML = shown.slice(-200).reverse().map(eventHtml).join('') || '<li class="muted">No events yet.</li>';
}

// ---- actions -----------------------------------------------------------

/// Asks with the confirmation dialog; resolves to the typed value (or true), or null.
function confirmAction(text, field) {
  return new Promise((resolve) => {
    const dialog = $('confirm');
    $('confirm-text').textContent = text;
    $('confirm-field').hidden = !field;
    if (field) { $('confirm-label').textContent = field.label; $('confirm-input').value = field.value; }
    dialog.returnValue = '';
    dialog.addEventListener('close', () => {
      if (dialog.returnValue !== 'ok') return resolve(null);
      resolve(field ? $('confirm-input').value.trim() : true);
    }, { once: true });
    dialog.showModal();
    (field ? $('confirm-input') : $('confirm-ok')).focus();
  });
}

async function serviceAction(action, arg) {
  const name = page().arg;
  let body = {};
  if (action === 'scale') {
    const value = await confirmAction(`Scale ${name} to how many replicas?`, { label: 'Replicas', value: arg });
    if (value === null) return;
    if (!/^\d+$/.test(value)) return toast('replicas: a whole number');
    body = { replicas: Number(value) };
  } else if (action === 'image') {
    const value = await confirmAction(`Roll ${name} out with which image?`, { label: 'Image', value: arg });
    if (value === null || value === '') return;
    body = { image: value };
  } else if (!(await confirmAction({
    promote: `Promote the new version of ${name}?`, pause: `Pause the deployment of ${name}?`,
    resume: `Resume the deployment of ${name}?`, rollback: `Roll ${name} back to its last good version?` }[action]))) {
    return;
  }
  try {
    state.service = await api('POST', `/api/services/${encodeURIComponent(name)}/${action}`, body);
    toast(`${action}: done`);
    refreshSoon();
  } catch (e) { if (!(e instanceof Unauthorized)) toast(`${action} refused: ${e.message}`); }
}

async function nodeAction(availability, node) {
  const verb = { active: 'Activate', pause: 'Pause', drain: 'Drain' }[availability];
  if (!(await confirmAction(`${verb} node ${node}?`))) return;
  try {
    await api('POST', `/api/nodes/${encodeURIComponent(node)}/availability`, { availability });
    toast(`${verb}: done`);
    refreshSoon();
  } catch (e) { if (!(e instanceof Unauthorized)) toast(`${verb} refused: ${e.message}`); }
}

// ---- start -------------------------------------------------------------

function start() {
  $('login').hidden = true;
  $('view').hidden = false;
  $('logout').hidden = false;
  refresh().then(startStream, (e) => { if (!(e instanceof Unauthorized)) toast(e.message); });
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', () => {
    state.service = null;
    render();
    refreshSoon();
    $('main').focus();
  });
  $('view').addEventListener('click', (event) => {
    const button = event.target.closest('button');
    if (!button) return;
    if (button.dataset.action) serviceAction(button.dataset.action, button.dataset.arg);
    else if (button.dataset.logs) showLogs(button.dataset.logs);
    else if (button.dataset.nodeAction) nodeAction(button.dataset.nodeAction, button.dataset.node);
  });
  $('view').addEventListener('input', (event) => {
    if (event.target.id === 'filter-service') state.filter.service = event.target.value.trim();
    else if (event.target.id === 'filter-node') state.filter.node = event.target.value.trim();
    else return;
    renderEvents();
  });
  start();
});

// For measurements: draw the map of any overview (a synthetic one included)
// and say how long building the page took.
window.skiff = {
  state,
  freeze() { state.frozen = true; stopStream(); },
  showOverview(overview) {
    const t0 = performance.now();
    state.overview = overview;
    render();
    void document.body.offsetHeight; // layout included
    return performance.now() - t0;
  },
};
