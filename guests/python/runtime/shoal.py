"""What a Python function running on Shoal can reach: shared state,
other functions of its tenant, and HTTP.

    import shoal

    def handle(input: bytes) -> bytes:
        n = shoal.state.incr("visits")
        return f"visit {n}".encode()

An HTTP function defines `on_fetch(request: shoal.Request)` instead, and
returns a `shoal.Response`. `shoal.fetch(url)` sends a request where the
function's allow-list lets it go.

Every failure of the host raises `shoal.Error` (or the subclass naming
why: `NotFound`, `TooLarge`, `LimitExceeded`, `Denied`, `Unavailable`,
`HttpError`).
"""

import json as _json
import urllib.parse as _urlparse
from contextlib import contextmanager

from componentize_py_types import Err, Ok
from wit_world.imports import invoke as _invoke
from wit_world.imports import outgoing_handler as _outgoing
from wit_world.imports import queue as _queue
from wit_world.imports import state as _state
from wit_world.imports import streams as _streams
from wit_world.imports import shoal_function_types as _types
from wit_world.imports import wasi_http_types as _http


class Error(Exception):
    """A host call failed; `kind` says why."""

    kind = "other"


class NotFound(Error):
    kind = "not-found"


class TooLarge(Error):
    kind = "too-large"


class LimitExceeded(Error):
    kind = "limit-exceeded"


class Denied(Error):
    kind = "denied"


class Unavailable(Error):
    kind = "unavailable"


_KINDS = {
    _types.Error_NotFound: NotFound,
    _types.Error_TooLarge: TooLarge,
    _types.Error_LimitExceeded: LimitExceeded,
    _types.Error_Denied: Denied,
    _types.Error_Unavailable: Unavailable,
}


def _host(op, *args):
    try:
        return op(*args)
    except Err as failure:
        error = failure.value
        if isinstance(error, _types.Error_Other):
            raise Error(error.value) from None
        cls = _KINDS.get(type(error), Error)
        raise cls(cls.kind) from None


def _bytes(value):
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class _State:
    """Shared state, scoped to the function's tenant (wit/shoal.wit; ARCHITECTURE.md, "What a guest can rely on")."""

    def get(self, key: str) -> bytes | None:
        return _host(_state.get, key)

    def set(self, key: str, value: bytes | str) -> None:
        _host(_state.set, key, _bytes(value))

    def delete(self, key: str) -> None:
        _host(_state.delete, key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return _host(_state.get_range, key, offset, length)

    def set_range(self, key: str, offset: int, data: bytes | str) -> None:
        _host(_state.set_range, key, offset, _bytes(data))

    def append(self, key: str, data: bytes | str) -> None:
        _host(_state.append, key, _bytes(data))

    def incr(self, key: str, delta: int = 1) -> int:
        return _host(_state.incr, key, delta)

    def push(self, key: str) -> None:
        _host(_state.push, key)

    def pull(self, key: str) -> None:
        _host(_state.pull, key)

    def lock(self, key: str) -> None:
        _host(_state.lock, key)

    def unlock(self, key: str) -> None:
        _host(_state.unlock, key)

    @contextmanager
    def locked(self, key: str):
        """`with shoal.state.locked("k"):` holds the lock for the block."""
        self.lock(key)
        try:
            yield
        finally:
            self.unlock(key)


state = _State()


def call(function: str, input: bytes | str = b"") -> bytes:
    """Run `function` of this tenant and return its output."""
    return _host(_invoke.call, function, _bytes(input))


def spawn(function: str, input: bytes | str = b"") -> int:
    """Start `function` and return its call id at once."""
    return _host(_invoke.spawn, function, _bytes(input))


def wait(call_id: int) -> bytes:
    """The output of a call started by `spawn`."""
    return _host(_invoke.await_, call_id)


class _Queue:
    """This tenant's queues: `shoal.queue.send("orders", b"...")` stores a
    message durably and returns its id; the queue's consumer function gets
    it in a batch."""

    def send(self, queue: str, body: bytes | str) -> str:
        return _host(_queue.send, queue, _bytes(body))

    def send_batch(self, queue: str, bodies) -> list:
        return _host(_queue.send_batch, queue, [_bytes(b) for b in bodies])


queue = _Queue()


# --- HTTP --------------------------------------------------------------------


class HttpError(Error):
    """An outbound request failed: refused (not on the allow-list, a
    private address, a per-call limit) or failed on the way."""

    kind = "http"


class Headers:
    """HTTP headers: names case-insensitive, a name may repeat, values are
    `str` (bytes that are not UTF-8 are read as Latin-1, losing nothing)."""

    def __init__(self, items=None):
        self._items = []
        if isinstance(items, Headers):
            items = items.items()
        elif isinstance(items, dict):
            items = items.items()
        for name, value in items or ():
            self.add(name, value)

    def add(self, name: str, value) -> None:
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("latin-1")
        self._items.append((name.lower(), str(value)))

    def set(self, name: str, value) -> None:
        self.delete(name)
        self.add(name, value)

    def delete(self, name: str) -> None:
        name = name.lower()
        self._items = [(n, v) for n, v in self._items if n != name]

    def get(self, name: str, default=None):
        """The first value of `name`, or `default`."""
        name = name.lower()
        return next((v for n, v in self._items if n == name), default)

    def get_all(self, name: str) -> list:
        name = name.lower()
        return [v for n, v in self._items if n == name]

    def items(self) -> list:
        return list(self._items)

    def __contains__(self, name) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value) -> None:
        self.set(name, value)

    def __iter__(self):
        return iter(dict.fromkeys(n for n, _ in self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def _fields(self):
        return _http.Fields.from_list([(n, _value_bytes(v)) for n, v in self._items])


def _value_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


class Request:
    """A request to an HTTP function: `method`, `path` (after the
    function's prefix, starting with `/`), `query` (the raw query string,
    without `?`), `args` (the query parsed: name -> first value),
    `headers`, and `body` (bytes; read on first use)."""

    def __init__(self, method="GET", path="/", query="", headers=None, body=b""):
        self.method = method
        self.path = path
        self.query = query
        self.headers = Headers(headers)
        self._body = body
        self._incoming = None

    @property
    def args(self) -> dict:
        return {name: values[0] for name, values in _urlparse.parse_qs(self.query, keep_blank_values=True).items()}

    @property
    def body(self) -> bytes:
        if self._incoming is not None:
            incoming, self._incoming = self._incoming, None
            self._body = _read_all(incoming)
        return self._body

    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return _json.loads(self.body)

    def __repr__(self) -> str:
        return f"Request({self.method} {self.path}{'?' + self.query if self.query else ''})"


class Response:
    """What an HTTP function answers, and what `fetch` returns.

    `body` is bytes, a str (sent as UTF-8), or an iterable of bytes/str
    chunks, sent as they are produced (a large or slow answer is never
    held whole). `Response.json(value)` answers JSON."""

    def __init__(self, body=b"", status: int = 200, headers=None):
        self.status = status
        self.headers = Headers(headers)
        self.body = body

    @classmethod
    def json(cls, value, status: int = 200, headers=None):
        response = cls(_json.dumps(value).encode(), status, headers)
        if "content-type" not in response.headers:
            response.headers.set("content-type", "application/json")
        return response

    def text(self) -> str:
        return _body_bytes(self.body).decode()

    def read_json(self):
        return _json.loads(_body_bytes(self.body))

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def __repr__(self) -> str:
        return f"Response({self.status})"


def _body_bytes(body) -> bytes:
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    return b"".join(_bytes(chunk) for chunk in body)


_READ = 65536


def _read_all(incoming_body) -> bytes:
    """The whole of an incoming body (of a request or a response)."""
    chunks = []
    with incoming_body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(_READ))
            except Err as failure:
                if isinstance(failure.value, _streams.StreamError_Closed):
                    break
                raise HttpError("reading the body failed") from None
    _http.IncomingBody.finish(incoming_body)
    return b"".join(chunks)


def _write_all(stream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        room = stream.check_write()
        if room == 0:
            with stream.subscribe() as ready:
                ready.block()
            continue
        stream.write(bytes(view[:room]))
        view = view[room:]


def _send_body(outgoing_body, body) -> None:
    """Write `body` (bytes, str or an iterable of chunks) and finish it."""
    with outgoing_body.write() as stream:
        if isinstance(body, (bytes, bytearray, memoryview, str)):
            _write_all(stream, _bytes(body))
        else:
            for chunk in body:
                _write_all(stream, _bytes(chunk))
                stream.blocking_flush()
        stream.blocking_flush()
    _http.OutgoingBody.finish(outgoing_body, None)


_METHODS = {
    "GET": _http.Method_Get,
    "HEAD": _http.Method_Head,
    "POST": _http.Method_Post,
    "PUT": _http.Method_Put,
    "DELETE": _http.Method_Delete,
    "CONNECT": _http.Method_Connect,
    "OPTIONS": _http.Method_Options,
    "TRACE": _http.Method_Trace,
    "PATCH": _http.Method_Patch,
}


def _method_name(method) -> str:
    if isinstance(method, _http.Method_Other):
        return method.value
    return type(method).__name__.removeprefix("Method_").upper()


def _error_text(code) -> str:
    name = type(code).__name__.removeprefix("ErrorCode_")
    words = "".join(" " + c.lower() if c.isupper() else c for c in name).strip()
    detail = getattr(code, "value", None)
    if isinstance(detail, str) and detail:
        return f"{words}: {detail}"
    return words


def fetch(url: str, *, method: str = "GET", headers=None, body=None) -> Response:
    """Send a request and return the response, its body read whole.

    Only to hosts on the function's allow-list (`--allow-host`); a refusal
    or a failure raises `shoal.HttpError` (and is named in the call's logs).
    """
    parts = _urlparse.urlsplit(url)
    if parts.scheme == "http":
        scheme = _http.Scheme_Http()
    elif parts.scheme == "https":
        scheme = _http.Scheme_Https()
    else:
        raise HttpError(f"fetch takes an http:// or https:// URL, not {url!r}")
    if not parts.netloc:
        raise HttpError(f"the URL {url!r} names no host")
    method = method.upper()
    request = _http.OutgoingRequest(Headers(headers)._fields())
    kind = _METHODS.get(method)
    request.set_method(kind() if kind else _http.Method_Other(method))
    request.set_scheme(scheme)
    request.set_authority(parts.netloc)
    request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    outgoing_body = request.body()
    try:
        future = _outgoing.handle(request, None)
    except Err as failure:
        raise HttpError(f"{method} {url}: {_error_text(failure.value)}") from None
    try:
        _send_body(outgoing_body, body if body is not None else b"")
    except Err:
        pass  # The request failed: its response says why.
    with future:
        while (answer := future.get()) is None:
            with future.subscribe() as ready:
                ready.block()
    if isinstance(answer, Ok) and isinstance(answer.value, Ok):
        incoming = answer.value.value
    else:
        failure = answer.value if isinstance(answer, Err) else answer.value.value
        raise HttpError(f"{method} {url}: {_error_text(failure)}") from None
    with incoming:
        status = incoming.status()
        with incoming.headers() as fields:
            response_headers = Headers(fields.entries())
        data = _read_all(incoming.consume())
    return Response(data, status, response_headers)


# Called by the runtime (shoal_runtime.py), not by functions.


def _incoming_request(incoming) -> Request:
    path_with_query = incoming.path_with_query() or "/"
    path, _, query = path_with_query.partition("?")
    with incoming.headers() as fields:
        headers = fields.entries()
    request = Request(_method_name(incoming.method()), path, query, headers)
    request._incoming = incoming.consume()
    return request


def _respond(response_out, answer) -> None:
    if isinstance(answer, Response):
        response = answer
    elif answer is None:
        response = Response(b"", 204)
    elif isinstance(answer, (bytes, bytearray, memoryview, str)):
        response = Response(answer)
    else:
        raise TypeError(f"on_fetch returned {type(answer).__name__}; return a shoal.Response, bytes, str or None")
    if not isinstance(response.status, int) or not 100 <= response.status <= 999:
        raise ValueError(f"status {response.status!r} is not an HTTP status code")
    outgoing = _http.OutgoingResponse(response.headers._fields())
    outgoing.set_status_code(response.status)
    outgoing_body = outgoing.body()
    _http.ResponseOutparam.set(response_out, Ok(outgoing))
    _send_body(outgoing_body, response.body)
