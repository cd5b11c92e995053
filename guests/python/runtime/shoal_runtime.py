"""Shoal's Python runtime: one CPython shared by every Python function.

Shoal deploys a Python function by calling `Loader.load` with its source
files in a fresh instance of this runtime and keeping the memory that
results as the function's snapshot; every call then starts from that
snapshot and goes to `Handler.handle`. Nothing here is per call.
"""

import contextlib
import gc
import importlib.abc
import importlib.util
import sys
import traceback

# The standard library a function may import. The runtime is snapshotted
# after these imports (componentize-py keeps only modules imported while it
# builds the runtime; nothing is read from files at run time), so they cost
# every function nothing: their memory is the runtime's, shared by all.
# Keep the list in step with docs/python.md.
import abc  # noqa: F401
import array  # noqa: F401
import base64  # noqa: F401
import binascii  # noqa: F401
import bisect  # noqa: F401
import calendar  # noqa: F401
import collections  # noqa: F401
import collections.abc  # noqa: F401
import contextlib  # noqa: F401
import copy  # noqa: F401
import csv  # noqa: F401
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import difflib  # noqa: F401
import enum  # noqa: F401
import fractions  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import heapq  # noqa: F401
import hmac  # noqa: F401
import html  # noqa: F401
import io  # noqa: F401
import os
import ipaddress  # noqa: F401
import itertools  # noqa: F401
import json  # noqa: F401
import math  # noqa: F401
import operator  # noqa: F401
import pprint  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import secrets  # noqa: F401
import statistics  # noqa: F401
import string  # noqa: F401
import struct  # noqa: F401
import textwrap  # noqa: F401
import time  # noqa: F401
import typing  # noqa: F401
import unicodedata  # noqa: F401
import urllib.parse  # noqa: F401
import uuid  # noqa: F401

import shoal

# Whatever environment the runtime was built in is not a function's: each
# call sets the env vars of its deploy (see Handler.handle).
os.environ.clear()

# Everything allocated so far is the runtime's, shared by every function:
# out of the collector's sight, so no collection (at a deploy or in a call)
# walks it, writing to its pages.
gc.freeze()

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import loader as _loader
from wit_world.imports import environment

ENTRY = "app"

# The loaded function's entry: `handle(input)`, or `on_fetch(request)` for
# an HTTP function.
_handle = None
_on_fetch = None


class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports modules from the function's files (held in memory)."""

    def __init__(self, files):
        self.files = files

    def _find(self, fullname):
        base = fullname.replace(".", "/")
        if base + ".py" in self.files:
            return base + ".py", False
        if base + "/__init__.py" in self.files:
            return base + "/__init__.py", True
        return None, False

    def find_spec(self, fullname, path=None, target=None):
        filename, is_package = self._find(fullname)
        if filename is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=filename, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename, _ = self._find(module.__name__)
        code = compile(self.files[filename], filename, "exec")
        exec(code, module.__dict__)


class Loader(exports.Loader):
    def load(self, files) -> _loader.Entry:
        global _handle, _on_fetch
        if _handle is not None or _on_fetch is not None:
            raise Err("this instance has loaded a function already")
        sources = {path: bytes(contents) for path, contents in files}
        if ENTRY + ".py" not in sources:
            raise Err(f"the function has no {ENTRY}.py (files: {', '.join(sorted(sources)) or 'none'})")
        sys.meta_path.insert(0, _SourceFinder(sources))
        # What the top level prints is kept off the real stdout and stderr:
        # writing there would leave this instance's stream handles in the
        # snapshot, where no later call's are the same.
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                module = __import__(ENTRY)
        except BaseException:
            output = printed.getvalue().strip()
            raise Err(_last_exception() + (f"\n{output}" if output else ""))
        handle = getattr(module, "handle", None)
        on_fetch = getattr(module, "on_fetch", None)
        if callable(on_fetch):
            _on_fetch = on_fetch
            entry = _loader.Entry.HTTP
        elif callable(handle):
            _handle = handle
            entry = _loader.Entry.BYTES
        else:
            raise Err(
                f"{ENTRY}.py defines no function `handle(input: bytes) -> bytes` "
                "(or `on_fetch(request: shoal.Request) -> shoal.Response` for an HTTP function)"
            )
        # The same for the function's own objects: a call's collections
        # walk only what the call allocated.
        gc.freeze()
        return entry


def _start_call():
    """What every call does first."""
    # The snapshot holds one state of the generator for every call:
    # each call draws its own numbers.
    # (16 bytes are plenty: the seed is hashed into the generator's
    # state; the default would read 2,500.)
    random.seed(os.urandom(16))
    # os.environ was filled when the runtime was built: the call's
    # are the ones set at deploy.
    wanted = dict(environment.get())
    if os.environ != wanted:
        os.environ.clear()
        os.environ.update(wanted)


class Handler(exports.Handler):
    def handle(self, input: bytes) -> bytes:
        if _handle is None:
            raise Err("this Python function takes HTTP requests, not bytes" if _on_fetch else "no function is loaded")
        _start_call()
        try:
            output = _handle(bytes(input))
        except Exception as error:
            traceback.print_exc()
            raise Err(_describe(error))
        if output is None:
            return b""
        if isinstance(output, str):
            return output.encode()
        if isinstance(output, (bytes, bytearray, memoryview)):
            return bytes(output)
        raise Err(f"handle returned {type(output).__name__}; return bytes, str or None")


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        if _on_fetch is None:
            # Left unanswered, the host answers 500 and logs why.
            print("this Python function takes bytes, not HTTP requests: define on_fetch(request)", file=sys.stderr)
            return
        _start_call()
        try:
            answer = _on_fetch(shoal._incoming_request(request))
            shoal._respond(response_out, answer)
        except Exception:
            # The call fails (a trap after the traceback): the host answers
            # 500 if nothing was sent yet, else cuts the body.
            traceback.print_exc()
            raise


def _describe(error):
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _last_exception():
    kind, error, tb = sys.exc_info()
    lines = traceback.format_exception(kind, error, tb)
    # Keep the function's own frames: drop the loader's.
    return "".join(line for line in lines if "importlib" not in line).strip()
