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
// (`./util.js`) and `shoal`.

import * as state from "shoal:function/state@0.1.0";
import * as invoke from "shoal:function/invoke@0.1.0";
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
  text: (input) => decoder.decode(input),
  /** The env vars set at deploy, as an object. */
  env: () => Object.fromEntries(environment.get()),
});

let handleFn = null;

function describe(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

export const loader = {
  load(files) {
    if (handleFn !== null) throw "this instance has loaded a function already";
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
      const body = new Function("module", "exports", "require", `${sources.get(path)}\n//# sourceURL=${path}`);
      body(module, module.exports, requireFrom(slash < 0 ? "" : path.slice(0, slash)));
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
    if (typeof app?.handle !== "function") {
      throw `${ENTRY} exports no function handle(input): set exports.handle`;
    }
    handleFn = app.handle;
  },
};

export const handler = {
  handle(input) {
    if (handleFn === null) throw "no function is loaded in this JavaScript runtime";
    let output;
    try {
      output = handleFn(input);
    } catch (error) {
      console.error(error?.stack ?? String(error));
      throw describe(error);
    }
    if (output === undefined || output === null) return new Uint8Array();
    if (typeof output === "string") return encoder.encode(output);
    if (output instanceof Uint8Array) return output;
    if (output instanceof ArrayBuffer || ArrayBuffer.isView(output)) return new Uint8Array(output.buffer ?? output);
    throw `handle returned ${typeof output}; return a string, a Uint8Array or nothing`;
  },
};
