"""What a Python function running on Shoal can reach: shared state and
other functions of its tenant.

    import shoal

    def handle(input: bytes) -> bytes:
        n = shoal.state.incr("visits")
        return f"visit {n}".encode()

Every failure of the host raises `shoal.Error` (or the subclass naming
why: `NotFound`, `TooLarge`, `LimitExceeded`, `Denied`, `Unavailable`).
"""

from contextlib import contextmanager

from componentize_py_types import Err
from wit_world.imports import invoke as _invoke
from wit_world.imports import state as _state
from wit_world.imports import types as _types


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
