// Shoal's JavaScript runtime: one engine (StarlingMonkey, built by
// componentize-js) shared by every JavaScript function.
//
// Shoal deploys a JavaScript function by calling `loader.load` with its
// source files in a fresh instance of this runtime and keeping the memory
// that results as the function's snapshot; every call then starts from that
// snapshot and goes to `handler.handle`.
//
// A function is CommonJS-style: `app.js` sets `exports.handle` (or
// `module.exports = { handle }`), and `require` reaches its own files
// (`./util.js`) and `shoal`. An HTTP function answers requests in the
// Workers style instead: `export default { fetch(request) { ... } }`
// (also `exports.fetch = ...`) or `addEventListener("fetch", ...)`; its
// requests come in through wasi:http (StarlingMonkey's fetch event) and
// reach it here. `fetch` sends requests where the allow-list lets them go.

import * as state from "shoal:function/state@0.1.0";
import * as invoke from "shoal:function/invoke@0.1.0";
import * as queue from "shoal:function/queue@0.1.0";
import * as environment from "shoal:function/environment@0.1.0";

const ENTRY = "app.js";

/** A failed host call; `kind` says why. */
class ShoalError extends Error {
  constructor(kind, message) {
    super(message ?? kind);
    this.name = "ShoalError";
    this.kind = kind;
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function bytes(value) {
  return typeof value === "string" ? encoder.encode(value) : new Uint8Array(value);
}

// The bindings throw the WIT error variant ({ tag, val }) as `payload`.
function host(op, ...args) {
  try {
    return op(...args);
  } catch (failure) {
    const error = failure?.payload ?? failure;
    if (error && typeof error.tag === "string") {
      throw new ShoalError(error.tag, error.tag === "other" ? error.val : undefined);
    }
    throw failure;
  }
}

const shoal = Object.freeze({
  Error: ShoalError,
  state: Object.freeze({
    get: (key) => host(state.get, key) ?? null,
    set: (key, value) => host(state.set, key, bytes(value)),
    delete: (key) => host(state.delete, key),
    getRange: (key, offset, length) => host(state.getRange, key, BigInt(offset), BigInt(length)),
    setRange: (key, offset, data) => host(state.setRange, key, BigInt(offset), bytes(data)),
    append: (key, data) => host(state.append, key, bytes(data)),
    incr: (key, delta = 1) => Number(host(state.incr, key, BigInt(delta))),
    push: (key) => host(state.push, key),
    pull: (key) => host(state.pull, key),
    lock: (key) => host(state.lock, key),
    unlock: (key) => host(state.unlock, key),
  }),
  call: (name, input = "") => host(invoke.call, name, bytes(input)),
  spawn: (name, input = "") => host(invoke.spawn, name, bytes(input)),
  wait: (id) => host(invoke.await, BigInt(id)),
  /** This tenant's queues: `shoal.queue.send("orders", body)` → the message's id. */
  queue: Object.freeze({
    send: (name, body) => host(queue.send, name, bytes(body)),
    sendBatch: (name, bodies) => host(queue.sendBatch, name, bodies.map(bytes)),
  }),
  text: (input) => decoder.decode(input),
  /** The env vars set at deploy, as an object. */
  env: () => Object.fromEntries(environment.get()),
});

let handleFn = null;
// An HTTP function's entry: its `fetch(request)`, or the listener it added.
let fetchFn = null;
let fetchListener = null;

function describe(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

export const loader = {
  load(files) {
    if (handleFn !== null || fetchFn !== null || fetchListener !== null) {
      throw "this instance has loaded a function already";
    }
    const sources = new Map(files.map(([path, contents]) => [path, decoder.decode(contents)]));
    if (!sources.has(ENTRY)) {
      throw `the function has no ${ENTRY} (files: ${[...sources.keys()].sort().join(", ") || "none"})`;
    }
    const modules = new Map();
    const requireFrom = (dir) => (name) => {
      if (name === "shoal") return shoal;
      if (!name.startsWith("./") && !name.startsWith("../")) {
        throw new Error(`cannot find module '${name}': only the function's own files and 'shoal' can be required`);
      }
      const parts = (dir ? dir.split("/") : []).concat(name.split("/"));
      const resolved = [];
      for (const part of parts) {
        if (part === "..") resolved.pop();
        else if (part !== "." && part !== "") resolved.push(part);
      }
      let path = resolved.join("/");
      if (!sources.has(path) && sources.has(path + ".js")) path += ".js";
      if (modules.has(path)) return modules.get(path).exports;
      if (!sources.has(path)) throw new Error(`cannot find module '${name}'`);
      const module = { exports: {} };
      modules.set(path, module);
      const slash = path.lastIndexOf("/");
      // `export default { ... }` (the Workers style) is read as
      // `module.exports = { ... }`: the files are evaluated as functions.
      const text = sources.get(path).replace(/^export\s+default\s+/m, "module.exports = ");
      const body = new Function(
        "module",
        "exports",
        "require",
        "addEventListener",
        `${text}\n//# sourceURL=${path}`,
      );
      body(module, module.exports, requireFrom(slash < 0 ? "" : path.slice(0, slash)), addListener);
      return module.exports;
    };
    // What the top level logs is dropped: writing to the real stdout or
    // stderr now would leave this instance's stream handles in the
    // snapshot, where no later call's are the same.
    const saved = { ...console };
    for (const method of ["log", "info", "warn", "error", "debug", "trace"]) console[method] = () => {};
    let app;
    try {
      app = requireFrom("")(`./${ENTRY}`);
    } catch (error) {
      throw describe(error);
    } finally {
      Object.assign(console, saved);
    }
    if (typeof app?.fetch === "function") {
      fetchFn = app.fetch.bind(app);
      return "http";
    }
    if (fetchListener !== null) return "http";
    if (typeof app?.handle !== "function") {
      throw `${ENTRY} exports no function handle(input): set exports.handle (or, for an HTTP function, export default { fetch(request) })`;
    }
    handleFn = app.handle;
    return "bytes";
  },
};

// What a function's `addEventListener` does: only "fetch" is an event here.
function addListener(type, listener) {
  if (type !== "fetch") throw new Error(`there is no "${type}" event: only "fetch" (an HTTP request)`);
  if (typeof listener !== "function") throw new Error("addEventListener needs a function");
  fetchListener = listener;
}

// Every HTTP request comes here first (StarlingMonkey's fetch event).
addEventListener("fetch", (event) => {
  if (fetchFn !== null) {
    event.respondWith(
      (async () => {
        const response = await fetchFn(event.request);
        if (!(response instanceof Response)) {
          throw new TypeError(`fetch returned ${typeof response}; return a Response`);
        }
        return response;
      })(),
    );
  } else if (fetchListener !== null) {
    fetchListener(event);
  } else {
    event.respondWith(new Response("this JavaScript function takes bytes, not HTTP requests\n", { status: 500 }));
  }
});

function output(value) {
  if (value === undefined || value === null) return new Uint8Array();
  if (typeof value === "string") return encoder.encode(value);
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) return new Uint8Array(value.buffer ?? value);
  throw `handle returned ${typeof value}; return a string, a Uint8Array or nothing`;
}

export const handler = {
  handle(input) {
    if (handleFn === null) {
      throw fetchFn || fetchListener ? "this JavaScript function takes HTTP requests, not bytes" : "no function is loaded";
    }
    const failed = (error) => {
      console.error(error?.stack ?? String(error));
      return describe(error);
    };
    let value;
    try {
      value = handleFn(input);
    } catch (error) {
      throw failed(error);
    }
    // An async handle (awaiting `fetch`): the event loop runs until it
    // settles.
    if (typeof value?.then === "function") {
      return value.then(output, (error) => {
        throw failed(error);
      });
    }
    return output(value);
  },
};
