// The Shoal console: one page, no dependencies, talking to the same HTTP
// API as the CLI with the token the user signs in with. Everything a
// function or a tenant controls (output, log lines, keys, names, errors)
// goes on the page as text nodes, never as markup.
'use strict';

const TOKEN_KEY = 'shoal.token';
const TENANT_KEY = 'shoal.tenant';

// ---- small helpers -------------------------------------------------------

// An element: `attrs` sets properties and attributes (`on*` functions are
// listeners); children are nodes or strings (made text nodes).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'text') {
      el.textContent = String(value);
    } else if (key === 'value' || key === 'checked' || key === 'disabled') {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

function byId(id) {
  return document.getElementById(id);
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms >= 1000) return (ms / 1000).toFixed(2) + ' s';
  if (ms >= 1) return ms.toFixed(ms >= 100 ? 0 : 1) + ' ms';
  return Math.round(ms * 1000) + ' µs';
}

function fmtUs(us) {
  return us === null || us === undefined ? '–' : fmtMs(us / 1000);
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (Number.isInteger(n) ? n : n.toFixed(1)) + ' ' + units[i];
}

function fmtTime(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : '–';
}

function fmtPct(x) {
  return (x * 100).toFixed(x >= 0.1 ? 0 : 1) + '%';
}

function hex(bytes) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = Array.from(bytes.slice(i, i + 16), (b) => b.toString(16).padStart(2, '0')).join(' ');
    lines.push(i.toString(16).padStart(8, '0') + '  ' + row);
  }
  return lines.join('\n');
}

// Bytes as the user wants to read them: JSON pretty-printed, other UTF-8
// as text, anything else as hex.
// The most bytes put on the page (a huge output or value would stall the tab).
const SHOWN_BYTES = 256 * 1024;

function showBytes(all) {
  if (all.length === 0) return { kind: 'empty', text: '' };
  const bytes = all.length > SHOWN_BYTES ? all.slice(0, SHOWN_BYTES) : all;
  const shown = showAll(bytes);
  if (bytes !== all) shown.text += '\n… (the first ' + fmtBytes(SHOWN_BYTES) + ' of ' + fmtBytes(all.length) + ')';
  return shown;
}

function showAll(bytes) {
  let text;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch (_) {
    return { kind: 'bytes (hex)', text: hex(bytes) };
  }
  const trimmed = text.trim();
  if (trimmed.startsWith('{') || trimmed.startsWith('[')) {
    try {
      return { kind: 'JSON', text: JSON.stringify(JSON.parse(trimmed), null, 2) };
    } catch (_) {
      /* not JSON after all */
    }
  }
  return { kind: 'text', text };
}

function base64Bytes(b64) {
  const raw = atob(b64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

// ---- the API -------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

// Each page's requests are aborted when the user leaves it.
let pageAbort = new AbortController();

async function api(method, path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set('Authorization', 'Bearer ' + token);
  const response = await fetch(path, {
    method,
    headers,
    body: options.body,
    signal: options.signal || pageAbort.signal,
    credentials: 'omit',
    cache: 'no-store',
  });
  if (!response.ok) {
    let kind = 'http_' + response.status;
    let message = response.statusText || 'request failed';
    try {
      const body = await response.json();
      if (body && body.error) {
        kind = body.error.kind;
        message = body.error.message;
      }
    } catch (_) {
      /* not a JSON error */
    }
    if (response.status === 401 && !options.quiet401) {
      signOut('Your token is no longer accepted (' + message + '). Sign in again.');
    }
    throw new ApiFailure(response.status, kind, message);
  }
  if (options.raw) return response;
  if (response.status === 204 || response.status === 202 && options.empty) return null;
  return response.json();
}

function enc(part) {
  return encodeURIComponent(part);
}

function errorBox(e) {
  if (e instanceof ApiFailure) return h('div', { class: 'error', role: 'alert' }, e.kind + ': ' + e.message);
  return h('div', { class: 'error', role: 'alert' }, String(e && e.message ? e.message : e));
}

function aborted(e) {
  return e && e.name === 'AbortError';
}

// ---- session -------------------------------------------------------------

const session = { admin: false, tenant: null, tenants: [] };

function currentTenant() {
  return session.admin ? sessionStorage.getItem(TENANT_KEY) : session.tenant;
}

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(TENANT_KEY);
  session.admin = false;
  session.tenant = null;
  session.tenants = [];
  session.why = why || null;
  if (location.hash !== '#/signin') location.hash = '#/signin';
  else render();
}

async function loadSession() {
  const who = await api('GET', '/v1/whoami', { quiet401: true });
  session.admin = who.admin;
  session.tenant = who.tenant;
  session.traceLink = who.trace_link || null;
  if (who.admin) {
    const list = await api('GET', '/v1/tenants');
    session.tenants = list.tenants.filter((t) => t.status === 'active').map((t) => t.name);
    const chosen = sessionStorage.getItem(TENANT_KEY);
    if (!chosen || !session.tenants.includes(chosen)) {
      if (session.tenants.length) sessionStorage.setItem(TENANT_KEY, session.tenants[0]);
      else sessionStorage.removeItem(TENANT_KEY);
    }
  }
}

// ---- layout and routing --------------------------------------------------

const PAGES = [
  ['functions', 'Functions'],
  ['calls', 'Async calls'],
  ['state', 'State'],
  ['usage', 'Usage'],
];

function drawBar(here) {
  const bar = clear(byId('bar'));
  bar.appendChild(h('span', { class: 'brand' }, 'Shoal'));
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  const pages = session.admin ? PAGES.concat([['admin', 'Admin']]) : PAGES;
  bar.appendChild(
    h('nav', {}, pages.map(([id, label]) => h('a', { href: '#/' + id, id: 'nav-' + id, class: here === id ? 'here' : null }, label))),
  );
  if (session.admin) {
    const select = h(
      'select',
      {
        id: 'tenant-select',
        title: 'Tenant',
        onchange: (e) => {
          sessionStorage.setItem(TENANT_KEY, e.target.value);
          render();
        },
      },
      session.tenants.map((t) => h('option', { value: t }, t)),
    );
    select.value = currentTenant() || '';
    bar.appendChild(h('span', { class: 'who' }, 'admin · tenant ', select));
  } else {
    bar.appendChild(h('span', { class: 'who', id: 'who' }, 'tenant ' + session.tenant));
  }
  bar.appendChild(h('button', { class: 'quiet', id: 'sign-out', onclick: () => signOut() }, 'Sign out'));
}

// Timers and loops of the page shown; stopped when it changes.
let timers = [];

function every(ms, f) {
  const signal = pageAbort.signal;
  const tick = async () => {
    try {
      await f();
    } finally {
      if (!signal.aborted) timers.push(setTimeout(tick, ms));
    }
  };
  tick();
}

function leavePage() {
  timers.forEach(clearTimeout);
  timers = [];
  pageAbort.abort();
  pageAbort = new AbortController();
}

async function render() {
  leavePage();
  const main = clear(byId('main'));
  let route, rest;
  try {
    [route, ...rest] = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  } catch (_) {
    [route, rest] = ['functions', []];
  }
  if (!sessionStorage.getItem(TOKEN_KEY) || route === 'signin') {
    if (sessionStorage.getItem(TOKEN_KEY) && route === 'signin') {
      location.hash = '#/functions';
      return;
    }
    drawBar(null);
    return signInPage(main);
  }
  if (session.admin === false && session.tenant === null) {
    try {
      await loadSession();
    } catch (e) {
      if (aborted(e)) return;
      if (e instanceof ApiFailure && e.status === 401) signOut('Signing in failed: ' + e.message);
      else main.appendChild(errorBox(e));
      return;
    }
  }
  drawBar(route || 'functions');
  const tenant = currentTenant();
  if (!tenant && route !== 'admin') {
    main.appendChild(h('p', { class: 'muted' }, 'There are no tenants yet: create one on the Admin page.'));
    return;
  }
  try {
    switch (route || 'functions') {
      case 'functions':
        return await functionsPage(main, tenant);
      case 'function':
        return await functionPage(main, tenant, rest[0]);
      case 'calls':
        return await callsPage(main, tenant, rest[0]);
      case 'state':
        return await statePage(main, tenant);
      case 'usage':
        return await usagePage(main, tenant);
      case 'admin':
        return await adminPage(main);
      default:
        main.appendChild(h('p', {}, 'No such page. ', h('a', { href: '#/functions' }, 'Functions')));
    }
  } catch (e) {
    if (!aborted(e)) main.appendChild(errorBox(e));
  }
}

// ---- sign in -------------------------------------------------------------

function signInPage(main) {
  const token = h('input', { type: 'password', id: 'token', autocomplete: 'off', placeholder: 'tenant.… or admin-…' });
  const problem = h('div', { id: 'signin-error' });
  if (session.why) problem.appendChild(errorBox(session.why));
  const form = h(
    'form',
    {
      class: 'card signin',
      id: 'signin',
      onsubmit: async (e) => {
        e.preventDefault();
        clear(problem);
        const value = token.value.trim();
        if (!value) return;
        sessionStorage.setItem(TOKEN_KEY, value);
        session.why = null;
        try {
          await loadSession();
        } catch (err) {
          sessionStorage.removeItem(TOKEN_KEY);
          problem.appendChild(errorBox(err));
          return;
        }
        if (location.hash === '#/functions') render();
        else location.hash = '#/functions';
      },
    },
    h('h1', {}, 'Sign in'),
    h('p', { class: 'muted' }, 'With a tenant token or the admin token. It stays in this tab only and goes to the node as a header.'),
    h('label', {}, 'Token', token),
    h('p', {}, h('button', { type: 'submit', id: 'sign-in' }, 'Sign in')),
    problem,
  );
  main.appendChild(form);
  token.focus();
}

// ---- charts --------------------------------------------------------------

// Bars of `values` (errors, if given, drawn over them in red).
function bars(values, errors, width = 240, height = 48) {
  const max = Math.max(1, ...values);
  const step = width / values.length;
  const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img' });
  svg.appendChild(s('line', { class: 'axis', x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
  values.forEach((v, i) => {
    if (!v) return;
    const barHeight = Math.max(1, (v / max) * (height - 2));
    svg.appendChild(s('rect', { class: 'bar', x: i * step + 0.5, y: height - barHeight, width: Math.max(1, step - 1), height: barHeight }));
    const bad = errors ? errors[i] : 0;
    if (bad) {
      const errHeight = Math.max(1, (bad / max) * (height - 2));
      svg.appendChild(s('rect', { class: 'bar err', x: i * step + 0.5, y: height - errHeight, width: Math.max(1, step - 1), height: errHeight }));
    }
  });
  return svg;
}

// Lines of p50 and p99 (null where a slot had no calls).
function latencyLines(series, width = 240, height = 48) {
  const max = Math.max(0.001, ...series.map((p) => p.p99_ms || 0));
  const step = width / series.length;
  const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img' });
  svg.appendChild(s('line', { class: 'axis', x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
  for (const [field, cls] of [['p99_ms', 'line p99'], ['p50_ms', 'line']]) {
    let d = '';
    const has = (i) => i >= 0 && i < series.length && series[i][field] !== null && series[i][field] !== undefined;
    series.forEach((p, i) => {
      if (!has(i)) return;
      const x = i * step + step / 2;
      const y = height - 1 - (p[field] / max) * (height - 3);
      d += (has(i - 1) ? ' L' : ' M') + x.toFixed(1) + ' ' + y.toFixed(1);
      // A slot with calls between two without: a dot, not an invisible line.
      if (!has(i - 1) && !has(i + 1)) svg.appendChild(s('circle', { class: cls.replace('line', 'dot'), cx: x, cy: y, r: 2 }));
    });
    if (d) svg.appendChild(s('path', { class: cls, d: d.trim() }));
  }
  return svg;
}

function chart(title, value, picture, id) {
  return h('div', { class: 'chart', id }, h('div', { class: 'title' }, title), h('div', { class: 'value' }, value), picture);
}

// ---- functions -----------------------------------------------------------

async function functionsPage(main, tenant) {
  main.appendChild(h('h1', {}, 'Functions of ', h('span', { class: 'mono' }, tenant)));
  const table = h('div', { id: 'functions' });
  main.appendChild(table);
  main.appendChild(deployForm(tenant));
  let first = true;
  every(3000, async () => {
    let list;
    try {
      list = await api('GET', '/v1/functions/' + enc(tenant));
    } catch (e) {
      if (!aborted(e)) clear(table).appendChild(errorBox(e));
      return;
    }
    clear(table).appendChild(functionsTable(tenant, list.functions));
    if (first) first = false;
  });
}

function functionsTable(tenant, functions) {
  if (!functions.length) return h('p', { class: 'muted', id: 'no-functions' }, 'No functions yet: deploy one below.');
  functions.sort((a, b) => a.name.localeCompare(b.name));
  return h(
    'table',
    { id: 'functions-table' },
    h(
      'thead',
      {},
      h(
        'tr',
        {},
        ['Name', 'Kind', 'Memory', 'Timeout', 'Snapshot', 'Calls/s', 'Errors', 'p50', 'p99', 'Last 5 min', ''].map((t, i) =>
          h('th', { class: i >= 5 && i <= 8 ? 'num' : null }, t),
        ),
      ),
    ),
    h(
      'tbody',
      {},
      functions.map((f) => {
        const a = f.activity || {};
        return h(
          'tr',
          { 'data-function': f.name },
          h('td', {}, h('a', { href: '#/function/' + enc(f.name), class: 'fn-link' }, f.name), f.url ? h('div', { class: 'muted mono' }, f.url) : null),
          h('td', {}, h('span', { class: 'tag' }, f.kind)),
          h('td', {}, fmtBytes(f.memory_bytes)),
          h('td', {}, fmtMs(f.timeout_ms)),
          h('td', {}, f.snapshot ? 'yes' : 'no'),
          h('td', { class: 'num rate' }, a.calls_per_second === undefined ? '–' : a.calls_per_second.toFixed(2)),
          h('td', { class: 'num ' + (a.error_rate > 0 ? 'bad' : '') }, a.calls ? fmtPct(a.error_rate) : '–'),
          h('td', { class: 'num' }, fmtMs(a.p50_ms)),
          h('td', { class: 'num' }, fmtMs(a.p99_ms)),
          h('td', {}, bars(a.calls_series || [], null, 120, 24)),
          h('td', {}, removeButton(tenant, f.name)),
        );
      }),
    ),
  );
}

// Removes asked for once (function → until when the second click counts)
// and the last failure of each: kept across the list's refreshes, which
// draw new buttons.
const armedRemovals = new Map();
const failedRemovals = new Map();

// A remove that asks once more (a second click within 4 s).
function removeButton(tenant, name, after) {
  const key = tenant + '/' + name;
  const isArmed = () => (armedRemovals.get(key) || 0) > Date.now();
  const label = () => {
    button.classList.toggle('armed', isArmed());
    button.textContent = isArmed() ? 'Confirm' : 'Remove';
  };
  const button = h('button', {
    class: 'danger',
    'data-remove': name,
    onclick: async () => {
      failedRemovals.delete(key);
      if (!isArmed()) {
        armedRemovals.set(key, Date.now() + 4000);
        label();
        setTimeout(label, 4100);
        return;
      }
      armedRemovals.delete(key);
      button.disabled = true;
      try {
        await api('DELETE', '/v1/functions/' + enc(tenant) + '/' + enc(name));
        if (after) after();
        else render();
      } catch (e) {
        if (aborted(e)) return;
        failedRemovals.set(key, e);
        button.replaceWith(errorBox(e));
      }
    },
  });
  label();
  const failed = failedRemovals.get(key);
  return failed ? h('span', {}, button, errorBox(failed)) : button;
}

function deployForm(tenant) {
  const file = h('input', { type: 'file', id: 'deploy-file', accept: '.wasm,.py,.js,.mjs,.tar' });
  const name = h('input', { type: 'text', id: 'deploy-name', placeholder: 'from the file name' });
  const language = h(
    'select',
    { id: 'deploy-language' },
    h('option', { value: '' }, 'from the file'),
    h('option', { value: 'python' }, 'Python'),
    h('option', { value: 'javascript' }, 'JavaScript'),
    h('option', { value: 'wasm' }, 'WebAssembly'),
  );
  const memory = h('input', { type: 'number', id: 'deploy-memory', min: 1, placeholder: 'default' });
  const timeout = h('input', { type: 'number', id: 'deploy-timeout', min: 1, placeholder: 'default' });
  const http = h('input', { type: 'checkbox', id: 'deploy-http' });
  const access = h('select', { id: 'deploy-access' }, h('option', { value: 'token' }, 'token'), h('option', { value: 'public' }, 'public'));
  const env = h('textarea', { id: 'deploy-env', placeholder: 'NAME=value, one per line (secrets belong in the tenant’s secrets)' });
  const result = h('div', { id: 'deploy-result' });
  file.addEventListener('change', () => {
    const f = file.files[0];
    if (f && !name.value) name.value = f.name.replace(/\.[^.]*$/, '').toLowerCase().replace(/[^a-z0-9-]+/g, '-').replace(/^-+|-+$/g, '');
  });
  const form = h(
    'form',
    {
      class: 'card',
      id: 'deploy',
      onsubmit: async (e) => {
        e.preventDefault();
        clear(result);
        const f = file.files[0];
        if (!f) return result.appendChild(errorBox('Choose a file: a .wasm module or component, a .py or .js file, or a .tar of a folder.'));
        const fnName = name.value.trim();
        if (!fnName) return result.appendChild(errorBox('Name the function.'));
        const query = new URLSearchParams();
        let lang = language.value;
        if (!lang) lang = /\.py$/i.test(f.name) ? 'python' : /\.m?js$/i.test(f.name) ? 'javascript' : /\.tar$/i.test(f.name) ? '' : 'wasm';
        if (!lang) return result.appendChild(errorBox('A .tar archive needs its language chosen.'));
        if (lang !== 'wasm') query.set('language', lang);
        if (memory.value) query.set('memory_mb', memory.value);
        if (timeout.value) query.set('timeout_ms', timeout.value);
        if (http.checked) {
          query.set('http', 'true');
          query.set('access', access.value);
        }
        for (const line of env.value.split('\n')) if (line.trim()) query.append('env', line.trim());
        const button = byId('deploy-go');
        button.disabled = true;
        button.textContent = 'Deploying…';
        try {
          const body = new Uint8Array(await f.arrayBuffer());
          const deployed = await api('PUT', '/v1/functions/' + enc(tenant) + '/' + enc(fnName) + '?' + query, { body });
          result.appendChild(h('p', { class: 'ok' }, 'Deployed ', h('a', { href: '#/function/' + enc(deployed.name) }, deployed.name), ' (' + deployed.kind + ', ' + fmtBytes(deployed.size_bytes) + ').'));
          form.reset();
        } catch (err) {
          if (!aborted(err)) result.appendChild(errorBox(err));
        } finally {
          button.disabled = false;
          button.textContent = 'Deploy';
        }
      },
    },
    h('h2', {}, 'Deploy'),
    h(
      'div',
      { class: 'row' },
      h('label', { class: 'grow' }, 'File', file),
      h('label', {}, 'Name', name),
      h('label', {}, 'Language', language),
      h('label', {}, 'Memory (MiB)', memory),
      h('label', {}, 'Timeout (ms)', timeout),
      h('label', {}, 'HTTP function', http),
      h('label', {}, 'Access', access),
    ),
    h('label', {}, 'Environment', env),
    h('p', {}, h('button', { type: 'submit', id: 'deploy-go' }, 'Deploy')),
    result,
  );
  return form;
}

// ---- one function --------------------------------------------------------

async function functionPage(main, tenant, name) {
  const base = '/v1/functions/' + enc(tenant) + '/' + enc(name);
  const f = await api('GET', base);
  main.appendChild(h('h1', {}, h('a', { href: '#/functions' }, 'Functions'), ' / ', h('span', { id: 'function-name' }, f.name)));
  const settings = [
    ['Kind', f.kind],
    ['Memory', fmtBytes(f.memory_bytes)],
    ['Timeout', fmtMs(f.timeout_ms)],
    ['Snapshot', f.snapshot ? 'yes' : 'no'],
    ['Size', fmtBytes(f.size_bytes)],
    ['SHA-256', h('span', { class: 'mono' }, f.sha256)],
    ['Deployed', new Date(f.deployed_ms).toLocaleString()],
    ['Env', f.env.length ? f.env.join(', ') : 'none'],
    ['Secrets', f.secrets.length ? f.secrets.join(', ') : 'none'],
    ['Outbound hosts', f.allowed_hosts.length ? f.allowed_hosts.join(', ') : 'none'],
  ];
  if (f.url) settings.push(['URL', h('span', { class: 'mono', id: 'function-url' }, f.url)], ['Access', f.access]);
  main.appendChild(
    h(
      'div',
      { class: 'card' },
      h('dl', { class: 'settings' }, settings.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      h('p', {}, removeButton(tenant, name, () => (location.hash = '#/functions'))),
    ),
  );
  if (f.kind !== 'http') main.appendChild(invokeForm(base));
  else main.appendChild(h('p', { class: 'muted' }, 'An HTTP function is called at its URL, with its own methods and paths.'));

  const charts = h('div', { class: 'charts', id: 'charts' });
  const recent = h('div', { id: 'recent' });
  main.append(h('h2', {}, 'Last five minutes on this node'), charts, h('h2', {}, 'Recent calls'), recent);
  every(2000, async () => {
    let activity;
    try {
      activity = await api('GET', base + '/calls');
    } catch (e) {
      if (!aborted(e)) clear(charts).appendChild(errorBox(e));
      return;
    }
    const last = activity.last_minute;
    clear(charts).append(
      chart('Calls/s (last minute)', h('span', { id: 'rate' }, last.calls_per_second.toFixed(2)), bars(activity.series.map((p) => p.calls), activity.series.map((p) => p.errors))),
      chart('Error rate', h('span', { id: 'error-rate', class: last.error_rate > 0 ? 'bad' : null }, fmtPct(last.error_rate)), bars(activity.series.map((p) => p.errors))),
      chart('p50 / p99', fmtMs(last.p50_ms) + ' / ' + fmtMs(last.p99_ms), latencyLines(activity.series)),
    );
    clear(recent).appendChild(recentCalls(activity.calls));
  });

  const logs = h('div', { class: 'logs', id: 'logs' }, h('div', { class: 'meta' }, 'Following the logs…'));
  main.append(h('h2', {}, 'Logs'), logs);
  followLogs(base, logs);
}

function recentCalls(calls) {
  if (!calls.length) return h('p', { class: 'muted', id: 'no-calls' }, 'No calls on this node yet.');
  return h(
    'table',
    { id: 'recent-table' },
    h('thead', {}, h('tr', {}, ['Call', 'Ended', 'Outcome', 'Duration', 'CPU', 'Trace'].map((t) => h('th', {}, t)))),
    h(
      'tbody',
      {},
      calls.map((c) =>
        h(
          'tr',
          { 'data-call': c.call_id },
          h('td', { class: 'mono' }, c.call_id),
          h('td', {}, fmtTime(c.time_ms)),
          h('td', { class: c.outcome === 'ok' ? 'ok' : 'bad' }, c.outcome),
          h('td', { class: 'num' }, fmtUs(c.duration_us)),
          h('td', { class: 'num' }, fmtUs(c.cpu_us)),
          h('td', { class: 'mono' }, traceCell(c.trace_id)),
        ),
      ),
    ),
  );
}

// A trace id, linked to the trace viewer the node names (`--trace-link`).
function traceCell(traceId) {
  if (!traceId) return '';
  if (!session.traceLink || !/^[0-9a-f]{32}$/.test(traceId)) return traceId;
  return h('a', { href: session.traceLink.replace('{trace_id}', traceId), target: '_blank', rel: 'noopener noreferrer', class: 'trace-link' }, traceId.slice(0, 16) + '…');
}

async function followLogs(base, box) {
  const signal = pageAbort.signal;
  let after = 0;
  let started = false;
  while (!signal.aborted) {
    let lines;
    try {
      const answer = await api('GET', base + '/logs?after=' + after + '&wait=' + (started ? 25 : 0), { signal });
      lines = answer.lines;
    } catch (e) {
      if (aborted(e) || signal.aborted) return;
      box.appendChild(errorBox(e));
      await new Promise((r) => setTimeout(r, 3000));
      continue;
    }
    if (!started) clear(box);
    started = true;
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    for (const line of lines) {
      after = Math.max(after, line.seq);
      box.appendChild(
        h(
          'div',
          { class: line.stream === 'stderr' ? 'stderr' : null, 'data-seq': line.seq },
          h('span', { class: 'meta' }, fmtTime(line.time_ms) + ' ' + line.call_id.slice(0, 8) + ' '),
          line.line,
        ),
      );
    }
    while (box.childNodes.length > 1000) box.removeChild(box.firstChild);
    if (!box.childNodes.length) box.appendChild(h('div', { class: 'meta', id: 'no-logs' }, 'No log lines yet.'));
    else if (byId('no-logs') && lines.length) byId('no-logs').remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
}

function invokeForm(base) {
  const input = h('textarea', { id: 'invoke-input', placeholder: 'Input (text), or choose a file' });
  const file = h('input', { type: 'file', id: 'invoke-file' });
  const async = h('input', { type: 'checkbox', id: 'invoke-async' });
  const out = h('div', { id: 'invoke-result' });
  return h(
    'form',
    {
      class: 'card',
      id: 'invoke',
      onsubmit: async (e) => {
        e.preventDefault();
        clear(out);
        const body = file.files[0] ? new Uint8Array(await file.files[0].arrayBuffer()) : new TextEncoder().encode(input.value);
        const button = byId('invoke-go');
        button.disabled = true;
        const started = performance.now();
        try {
          const response = await api('POST', base + '/invoke' + (async.checked ? '?async=true' : ''), { body, raw: true });
          const took = performance.now() - started;
          const id = response.headers.get('x-shoal-call-id') || '';
          if (async.checked) {
            const accepted = await response.json();
            out.appendChild(h('p', { class: 'ok' }, 'Accepted: ', h('a', { href: '#/calls/' + enc(accepted.call_id) }, accepted.call_id)));
            return;
          }
          const bytes = new Uint8Array(await response.arrayBuffer());
          const shown = showBytes(bytes);
          const cpu = response.headers.get('x-shoal-cpu-us');
          out.append(
            h('p', { class: 'muted' }, 'Call ', h('span', { class: 'mono', id: 'invoke-call-id' }, id), ' · ' + fmtMs(took) + ' round trip' + (cpu ? ' · ' + fmtUs(Number(cpu)) + ' CPU' : '') + ' · ' + shown.kind + ', ' + fmtBytes(bytes.length)),
            h('pre', { class: 'out', id: 'invoke-output' }, shown.text),
          );
        } catch (err) {
          if (!aborted(err)) out.appendChild(errorBox(err));
        } finally {
          button.disabled = false;
        }
      },
    },
    h('h2', {}, 'Invoke'),
    input,
    h('div', { class: 'row' }, h('label', {}, 'Or a file as input', file), h('label', {}, 'Asynchronously', async), h('button', { type: 'submit', id: 'invoke-go' }, 'Invoke')),
    out,
  );
}

// ---- asynchronous calls --------------------------------------------------

async function callsPage(main, tenant, id) {
  main.appendChild(h('h1', {}, 'Asynchronous calls'));
  if (id) {
    const call = await api('GET', '/v1/calls/' + enc(id));
    main.appendChild(callRecord(call));
  }
  const status = h(
    'select',
    { id: 'calls-status', onchange: () => load() },
    ['', 'queued', 'running', 'succeeded', 'failed'].map((v) => h('option', { value: v }, v || 'any status')),
  );
  const list = h('div', { id: 'calls-list' });
  main.append(h('div', { class: 'row' }, h('label', {}, 'Status', status)), list);
  async function load() {
    const query = new URLSearchParams({ tenant, limit: '100' });
    if (status.value) query.set('status', status.value);
    try {
      const answer = await api('GET', '/v1/calls?' + query);
      clear(list).appendChild(callsTable(answer.calls));
    } catch (e) {
      if (!aborted(e)) clear(list).appendChild(errorBox(e));
    }
  }
  every(4000, load);
}

function callsTable(calls) {
  if (!calls.length) return h('p', { class: 'muted' }, 'No asynchronous calls kept.');
  return h(
    'table',
    { id: 'calls-table' },
    h('thead', {}, h('tr', {}, ['Call', 'Function', 'Status', 'Queued', 'Ran', 'Attempts', 'Error'].map((t) => h('th', {}, t)))),
    h(
      'tbody',
      {},
      calls.map((c) => {
        const t = c.timings;
        const ran = t.started_at_ms && t.finished_at_ms ? fmtMs(t.finished_at_ms - t.started_at_ms) : '–';
        return h(
          'tr',
          { class: 'clickable', 'data-call': c.call_id, onclick: () => (location.hash = '#/calls/' + enc(c.call_id)) },
          h('td', { class: 'mono' }, c.call_id),
          h('td', {}, c.function),
          h('td', { class: c.status === 'failed' ? 'bad' : c.status === 'succeeded' ? 'ok' : 'warn' }, c.status),
          h('td', {}, fmtTime(t.queued_at_ms)),
          h('td', { class: 'num' }, ran),
          h('td', { class: 'num' }, c.attempts),
          h('td', {}, c.error ? c.error.kind + ': ' + c.error.message : ''),
        );
      }),
    ),
  );
}

function callRecord(call) {
  const t = call.timings;
  let output = null;
  if (call.output_base64 !== null && call.output_base64 !== undefined) {
    const shown = showBytes(base64Bytes(call.output_base64));
    output = [h('h2', {}, 'Output (' + shown.kind + ')'), h('pre', { class: 'out', id: 'call-output' }, shown.text)];
  }
  return h(
    'div',
    { class: 'card', id: 'call-record' },
    h(
      'dl',
      { class: 'settings' },
      [
        ['Call', h('span', { class: 'mono' }, call.call_id)],
        ['Function', call.function],
        ['Status', call.status],
        ['Attempts', call.attempts],
        ['Queued', fmtTime(t.queued_at_ms)],
        ['Started', fmtTime(t.started_at_ms)],
        ['Finished', fmtTime(t.finished_at_ms)],
        ['Error', call.error ? call.error.kind + ': ' + call.error.message : 'none'],
      ].map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]),
    ),
    output,
  );
}

// ---- state ---------------------------------------------------------------

async function statePage(main, tenant) {
  const base = '/v1/state/' + enc(tenant);
  main.appendChild(h('h1', {}, 'State of ', h('span', { class: 'mono' }, tenant)));
  const keys = h('div', { id: 'state-keys' });
  const viewer = h('div', { id: 'state-viewer' });
  const key = h('input', { type: 'text', id: 'state-key', placeholder: 'key' });
  const value = h('textarea', { id: 'state-value', placeholder: 'value (text)' });
  const result = h('div', { id: 'state-result' });
  // The whole key is one path segment (its `/` escaped): a key holding
  // `..` segments must never walk the request to another route with the
  // signed-in token. A key of only `.` or `..` cannot be a segment at all.
  const keyPath = (k) => {
    if (k === '.' || k === '..') throw new Error('The key ' + JSON.stringify(k) + ' cannot be addressed in a URL: use `shoal state` for it.');
    return base + '/' + enc(k);
  };
  async function load() {
    try {
      const answer = await api('GET', base);
      clear(keys).appendChild(keysTable(answer.keys));
    } catch (e) {
      if (!aborted(e)) clear(keys).appendChild(errorBox(e));
    }
  }
  async function view(k) {
    clear(viewer);
    try {
      const response = await api('GET', keyPath(k), { raw: true });
      const bytes = new Uint8Array(await response.arrayBuffer());
      const shown = showBytes(bytes);
      viewer.append(
        h('h2', {}, h('span', { class: 'mono' }, k), ' (' + shown.kind + ', ' + fmtBytes(bytes.length) + ')'),
        h('pre', { class: 'out', id: 'state-shown' }, shown.text),
      );
      key.value = k;
      if (shown.kind === 'text' || shown.kind === 'JSON' || shown.kind === 'empty') value.value = new TextDecoder().decode(bytes);
    } catch (e) {
      if (!aborted(e)) viewer.appendChild(errorBox(e));
    }
  }
  function keysTable(all) {
    if (!all.length) return h('p', { class: 'muted' }, 'No keys.');
    const list = all.slice(0, 1000);
    return h(
      'table',
      { id: 'state-table' },
      h('caption', { class: 'muted' }, all.length > list.length ? 'The first ' + list.length + ' of ' + all.length + ' keys (`shoal state ls` lists them all).' : ''),
      h('thead', {}, h('tr', {}, h('th', {}, 'Key'), h('th', { class: 'num' }, 'Size'), h('th', {}, ''))),
      h(
        'tbody',
        {},
        list.map((k) =>
          h(
            'tr',
            { 'data-key': k.key },
            h('td', {}, h('a', { href: '#/state', class: 'mono', onclick: (e) => (e.preventDefault(), view(k.key)) }, k.key)),
            h('td', { class: 'num' }, fmtBytes(k.size)),
            h(
              'td',
              {},
              h('button', {
                class: 'danger',
                text: 'Delete',
                'data-delete': k.key,
                onclick: async () => {
                  try {
                    await api('DELETE', keyPath(k.key));
                    clear(viewer);
                    load();
                  } catch (e) {
                    if (!aborted(e)) clear(result).appendChild(errorBox(e));
                  }
                },
              }),
            ),
          ),
        ),
      ),
    );
  }
  main.append(
    keys,
    viewer,
    h(
      'form',
      {
        class: 'card',
        id: 'state-form',
        onsubmit: async (e) => {
          e.preventDefault();
          clear(result);
          const k = key.value.trim();
          if (!k) return result.appendChild(errorBox('Name the key.'));
          try {
            await api('PUT', keyPath(k), { body: new TextEncoder().encode(value.value) });
            result.appendChild(h('p', { class: 'ok' }, 'Set ', h('span', { class: 'mono' }, k), '.'));
            await load();
            await view(k);
          } catch (err) {
            if (!aborted(err)) result.appendChild(errorBox(err));
          }
        },
      },
      h('h2', {}, 'Set a value'),
      h('div', { class: 'row' }, h('label', { class: 'grow' }, 'Key', key)),
      h('label', {}, 'Value', value),
      h('p', {}, h('button', { type: 'submit', id: 'state-set' }, 'Set')),
      result,
    ),
  );
  await load();
}

// ---- usage ---------------------------------------------------------------

async function usagePage(main, tenant) {
  main.appendChild(h('h1', {}, 'Usage of ', h('span', { class: 'mono' }, tenant)));
  const span = h(
    'select',
    { id: 'usage-span', onchange: () => load() },
    [
      ['3600', 'last hour (per minute)'],
      ['86400', 'last day (per 30 minutes)'],
      ['604800', 'last week (per 3 hours)'],
    ].map(([v, t]) => h('option', { value: v }, t)),
  );
  const body = h('div', { id: 'usage' });
  main.append(h('div', { class: 'row' }, h('label', {}, 'Span', span)), body);
  async function load() {
    const seconds = Number(span.value);
    const step = seconds <= 3600 ? 60 : seconds <= 86400 ? 1800 : 10800;
    const now = Math.floor(Date.now() / 1000);
    const from = now - seconds;
    const q = (extra) => new URLSearchParams({ from: String(from), to: String(now), step: String(step), ...extra });
    try {
      const [total, byFunction] = await Promise.all([
        api('GET', '/v1/tenants/' + enc(tenant) + '/usage?' + q({})),
        api('GET', '/v1/tenants/' + enc(tenant) + '/usage?' + q({ by: 'function' })),
      ]);
      clear(body).append(usageCharts(total, from, step, seconds / step), usageTable(byFunction.buckets));
    } catch (e) {
      if (!aborted(e)) clear(body).appendChild(errorBox(e));
    }
  }
  every(15000, load);
}

function usageCharts(total, from, step, n) {
  const slots = (field) => {
    const out = new Array(n).fill(0);
    for (const b of total.buckets) {
      const i = Math.floor((b.start - from) / step);
      if (i >= 0 && i < n) out[i] += typeof field === 'function' ? field(b) : b[field] || 0;
    }
    return out;
  };
  const errorsOf = (b) => b.calls - ((b.outcomes && b.outcomes.ok) || 0);
  const calls = slots('calls');
  const errors = slots(errorsOf);
  const cpu = slots((b) => (b.cpu_us || 0) / 1e6);
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  return h(
    'div',
    { class: 'charts' },
    chart('Calls', h('span', { id: 'usage-calls' }, sum(calls)), bars(calls, errors, 360, 60)),
    chart('Errors', sum(errors), bars(errors, null, 360, 60)),
    chart('CPU seconds', sum(cpu).toFixed(3), bars(cpu, null, 360, 60)),
  );
}

function usageTable(buckets) {
  const by = new Map();
  for (const b of buckets) {
    const row = by.get(b.function) || { calls: 0, errors: 0, cpu: 0, wall: 0, read: 0, written: 0 };
    row.calls += b.calls;
    row.errors += b.calls - ((b.outcomes && b.outcomes.ok) || 0);
    row.cpu += b.cpu_us || 0;
    row.wall += b.wall_us || 0;
    row.read += b.state_read_bytes || 0;
    row.written += b.state_written_bytes || 0;
    by.set(b.function, row);
  }
  if (!by.size) return h('p', { class: 'muted' }, 'No calls in this span.');
  return h(
    'table',
    { id: 'usage-table' },
    h('thead', {}, h('tr', {}, ['Function', 'Calls', 'Errors', 'CPU', 'Wall', 'State read', 'State written'].map((t, i) => h('th', { class: i ? 'num' : null }, t)))),
    h(
      'tbody',
      {},
      [...by.entries()]
        .sort((a, b) => b[1].calls - a[1].calls)
        .map(([name, r]) =>
          h(
            'tr',
            {},
            h('td', {}, name || '(all)'),
            h('td', { class: 'num' }, r.calls),
            h('td', { class: 'num' }, r.errors),
            h('td', { class: 'num' }, fmtUs(r.cpu)),
            h('td', { class: 'num' }, fmtUs(r.wall)),
            h('td', { class: 'num' }, fmtBytes(r.read)),
            h('td', { class: 'num' }, fmtBytes(r.written)),
          ),
        ),
    ),
  );
}

// ---- admin ---------------------------------------------------------------

async function adminPage(main) {
  if (!session.admin) {
    main.appendChild(h('p', {}, 'This page needs the admin token.'));
    return;
  }
  main.appendChild(h('h1', {}, 'Tenants'));
  const tenants = h('div', { id: 'tenants' });
  const members = h('div', { id: 'members' });
  main.append(tenants, h('h1', {}, 'Nodes'), members);
  every(5000, async () => {
    try {
      const [list, cluster] = await Promise.all([api('GET', '/v1/tenants'), api('GET', '/v1/cluster')]);
      clear(tenants).appendChild(tenantsTable(list.tenants));
      clear(members).appendChild(membersTable(cluster));
    } catch (e) {
      if (!aborted(e)) clear(tenants).appendChild(errorBox(e));
    }
  });
}

function tenantsTable(list) {
  if (!list.length) return h('p', { class: 'muted' }, 'No tenants yet (`shoal tenant create NAME`).');
  return h(
    'table',
    { id: 'tenants-table' },
    h('thead', {}, h('tr', {}, ['Tenant', 'Status', 'Functions', 'Weight', 'Running', 'Sandboxes', 'Memory', 'Local state', 'Global state'].map((t, i) => h('th', { class: i >= 2 ? 'num' : null }, t)))),
    h(
      'tbody',
      {},
      list.map((t) => {
        const e = t.limits.effective;
        const set = t.limits.set || {};
        const mark = (field, text) => h('td', { class: 'num', title: set[field] !== undefined && set[field] !== null ? 'set for this tenant' : 'the node’s default' }, text, set[field] !== undefined && set[field] !== null ? ' •' : '');
        return h(
          'tr',
          { 'data-tenant': t.name },
          h('td', {}, t.name),
          h('td', { class: t.status === 'active' ? 'ok' : 'warn' }, t.status),
          h('td', { class: 'num' }, t.functions),
          mark('weight', e.weight),
          mark('running', e.running),
          mark('sandboxes', e.sandboxes),
          mark('memory_bytes', fmtBytes(e.memory_bytes)),
          mark('local_bytes', fmtBytes(e.local_bytes)),
          mark('state_quota_bytes', fmtBytes(e.state_quota_bytes)),
        );
      }),
    ),
  );
}

function membersTable(cluster) {
  return h(
    'table',
    { id: 'members-table' },
    h('thead', {}, h('tr', {}, ['Node', 'Address', 'Joined', 'Load'].map((t) => h('th', {}, t)))),
    h(
      'tbody',
      {},
      cluster.members.map((m) => {
        const meter = h('span', { class: 'meter' }, h('span'));
        meter.firstChild.style.width = Math.min(100, (m.capacity ? m.running / m.capacity : 1) * 100) + '%';
        return h(
          'tr',
          {},
          h('td', { class: 'mono' }, (m.id || 'this node (single)') + (m.this_node && m.id ? ' (this one)' : '')),
          h('td', { class: 'mono' }, m.advertise || '–'),
          h('td', {}, m.started_ms ? new Date(m.started_ms).toLocaleString() : '–'),
          h('td', {}, meter, ' ' + m.running + ' / ' + m.capacity + ' running'),
        );
      }),
    ),
  );
}

// ---- start ---------------------------------------------------------------

window.addEventListener('hashchange', render);
render();
