"""The client: ``Spool.save()`` copies into the ring and returns a future at once.

Threads, and why each exists:
- the caller's thread: checks the variables, reserves ring space, copies host arrays
  (or queues the GPU copy) and hands the WRITE to the I/O thread. It never waits on
  the disk, and waits on the ring only by the ``on_full`` policy.
- the I/O thread (``_link``): owns the ZeroMQ DEALER socket (sockets are not
  thread-safe), sends WRITEs and heartbeats, turns DONE/ERR into future results, frees
  ring space.
- the copy thread (only once a save needs one): waits for each save's CUDA copy, or
  reorders its C-ordered host arrays (``_reorder``), in order, then releases its WRITE;
  so the daemon never reads unfinished bytes and messages keep the order of the saves.

Saves larger than the ring go in pieces (``_pieces``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import wait
from typing import TYPE_CHECKING, Any, Final

from . import _protocol as proto
from ._convert import LAYOUTS, ONED_AS, check_wire_size, copy_host, iter_arrays, prepare_value, to_spec
from ._curve import ClientKeys, is_tcp
from ._embedded import EmbeddedDaemon
from ._errors import FlushError, InvalidOptionError, MatspoolError, PayloadTooLarge, SpoolClosed
from ._matlab import V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name, normalize_format
from ._link import DaemonLink
from ._pieces import PiecesMixin
from ._reorder import AllOf, HostReorder, defers, stage, staged_bytes
from ._ring import Ring
from ._saves import End, Pending, SaveResult, aligned, place

if TYPE_CHECKING:
    from ._stream import Stream

__all__ = ["DEFAULT_RING_BYTES", "SaveResult", "Spool"]

log = logging.getLogger("matspool")

DEFAULT_RING_BYTES: Final = int(os.environ.get("MATSPOOL_RING_BYTES", 256 << 20))
_ON_FULL: Final = ("block", "raise")


_LIVE: weakref.WeakSet[Spool] = weakref.WeakSet()


@atexit.register
def _close_live_spools() -> None:
    """Process exit without close(): finish what was saved rather than drop it."""
    for spool in list(_LIVE):
        spool.close()


def _wait_with_progress(futures: list[Future[SaveResult]], timeout: float | None) -> Any:
    """``wait`` that, for a person at a terminal, shows how many saves are on disk."""
    if not futures or not sys.stderr.isatty():
        return wait(futures, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = False
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        result = wait(futures, 0.25 if left is None else min(0.25, left))
        if not result.not_done or (left is not None and left <= 0.25):
            if shown:
                sys.stderr.write("\r\x1b[K")
            return wait(futures, 0) if result.not_done else result
        n, k = len(futures), len(result.done)
        bar = "#" * (30 * k // n)
        sys.stderr.write(f"\rmatspool flush [{bar:<30}] {k}/{n} saves on disk")
        sys.stderr.flush()
        shown = True


def _cuda_in_use() -> bool:
    """True when the caller has already imported torch and CUDA is there."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


_MAX_KEPT_FAILURES: Final = 10_000  # flush() reports at most this many; the futures hold all


def _check_path(path: object) -> str:
    """Absolute (against the caller's cwd now) and representable on the wire."""
    try:
        text = os.fsdecode(os.fspath(path))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}") from None
    if not text or "\x00" in text:
        raise ValueError(f"path must be non-empty and contain no NUL byte: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path is not valid UTF-8: {text!r}") from None
    return os.path.abspath(text)


DEFAULT_LEVEL: Final = 3  # what MATLAB's own v7.3 writer uses


def _level(compress: object) -> int:
    """compress=False/True/0..9 -> a deflate level, 0 meaning off."""
    if isinstance(compress, bool):
        return DEFAULT_LEVEL if compress else 0
    if isinstance(compress, int) and 0 <= compress <= 9:
        return compress
    raise ValueError(f"compress must be True, False or a level 1-9, got {compress!r}")


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidOptionError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


class Spool(DaemonLink, PiecesMixin):
    """A connection to a writer daemon plus this process's ring.

    ``endpoint`` defaults to ``$MATSPOOL_ENDPOINT``; with neither, an embedded daemon is
    started for this spool. ``timeout`` bounds how long ``save()`` blocks on a full ring
    (``on_full="block"``) and how long the daemon may stay silent before pending saves
    fail with :class:`DaemonUnavailable`.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        ring_bytes: int = DEFAULT_RING_BYTES,
        on_full: str = "block",
        timeout: float = 60.0,
        *,
        ring_mode: int = 0o600,
        heartbeat: float = 1.0,
        connect_timeout: float = 30.0,
        curve: ClientKeys | None = None,
        compress: bool | int = False,
    ) -> None:
        self.on_full = _check_choice("on_full", on_full, _ON_FULL)
        self.compress = _level(compress)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        self.timeout = timeout
        self._heartbeat = heartbeat
        self._closed = False
        self._broken: MatspoolError | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._failed: list[BaseException] = []  # failures not yet reported by flush()
        self._seq = itertools.count()
        self._instance: str | None = None  # the daemon instance that welcomed us
        self._hello_sent = False
        self._embedded: EmbeddedDaemon | None = None
        self._ring: Ring | None = None
        self._copier: Any = None
        self._waiter: threading.Thread | None = None
        self._waitq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._order_lock = threading.Lock()
        self._queued = 0  # messages in _waitq or being handled by the copy thread
        self._copying: dict[int, Pending] = {}  # finished saves whose copy still runs

        endpoint = endpoint or os.environ.get("MATSPOOL_ENDPOINT") or None
        self._curve = curve or ClientKeys.from_env()
        self._remote = endpoint is not None and is_tcp(endpoint)
        if endpoint is not None and is_tcp(endpoint) and self._curve is None:
            raise ValueError(f"{endpoint} is a TCP endpoint: pass curve=ClientKeys(...) or set "
                             "MATSPOOL_CURVE_CLIENT_SECRET and MATSPOOL_CURVE_SERVER_PUBLIC")
        try:
            self._ring = Ring(ring_bytes, mode=ring_mode)
            if endpoint is None:
                self._embedded = EmbeddedDaemon()
                endpoint = self._embedded.endpoint
            self.endpoint = endpoint
            self._open_link(connect_timeout)
            if _cuda_in_use():
                self._cuda()  # pin the ring now, not in the first save() (12 ms per 256 MiB)
            _LIVE.add(self)
        except BaseException:
            self._teardown()
            raise

    # -- public API --------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        variables: Mapping[str, Any],
        *,
        format: str = "auto",
        layout: str = "matlab",
        oned_as: str = "row",
        fsync: bool = False,
        compress: bool | int | None = None,
        append: bool = False,
    ) -> Future[SaveResult]:
        """Queue ``variables`` for ``path``; returns a future at once.

        Checks happen here (names, types, format limits); write failures arrive
        through the future. ``layout="matlab"`` keeps indices (``A(i,j) == x[i,j]``),
        ``"raw"`` stores C-order bytes as they are (MATLAB sees the dims reversed),
        ``"hwc"`` turns 3-d CHW / 4-d NCHW images into HxWxC(xN). ``compress``
        (default: the spool's) deflates in the daemon: True is level 3, or give 1-9.
        ``append=True`` is MATLAB's ``save -append``: the variables are added to (or
        replace those in) an existing file, which keeps its format; atomically.
        """
        format = normalize_format(format)
        return self._submit(path, variables, format, layout, oned_as, fsync, compress, "write", append)

    def stream(
        self,
        path: str | os.PathLike[str],
        *,
        format: str = "v7.3",
        layout: str = "matlab",
        oned_as: str = "row",
        fsync: bool = False,
        compress: bool | int | None = None,
    ) -> Stream:
        """A file that grows by one step per ``append``: MATLAB sees ``[dims... n_steps]``.

        The first append replaces any file at ``path``; each later one extends every
        variable along a new trailing dimension. Only v7.3 can grow a variable.
        """
        from ._stream import Stream

        return Stream(self, path, format=format, layout=layout, oned_as=oned_as, fsync=fsync,
                      compress=compress)

    def _submit(self, path: str | os.PathLike[str], variables: Mapping[str, Any], fmt: str,
                layout: str, oned_as: str, fsync: bool, compress: bool | int | None,
                mode: str, append: bool = False) -> Future[SaveResult]:
        self._check_open()
        _check_choice("layout", layout, LAYOUTS)
        _check_choice("oned_as", oned_as, ONED_AS)
        if not isinstance(fsync, bool):
            raise TypeError(f"fsync must be a bool, got {fsync!r}")
        if not isinstance(variables, Mapping) or not variables:
            raise TypeError("variables must be a non-empty mapping of MATLAB names to arrays")
        if len(variables) > proto.MAX_VARS:
            raise ValueError(f"at most {proto.MAX_VARS} variables per save, got {len(variables)}")
        abspath = _check_path(path)
        level = self.compress if compress is None else _level(compress)
        values = {check_name(name): prepare_value(name, value, layout, oned_as)
                  for name, value in variables.items()}
        check_wire_size(values)
        arrays = [a for v in values.values() for a in iter_arrays(v)]
        if fmt == "auto":
            fmt = "v7.3" if any(a.nbytes > V5_MAX_VARIABLE_BYTES for a in arrays) else "v5"
        relative, total = place(arrays)
        over_v5 = fmt == "v5" and any(a.nbytes > V5_MAX_VARIABLE_BYTES or max(a.dims) > V5_MAX_DIM
                                      for a in arrays)
        if over_v5 or mode != "write":  # checked before any ring space is taken
            provisional = [to_spec(n, v, relative) for n, v in values.items()]
            if fmt == "v5":
                proto.check_v5_limits(provisional)
            if mode != "write":
                proto.check_stream_step(fmt, provisional)
        ring = self._ring
        assert ring is not None
        if total > ring.size and mode == "write":
            if append:
                raise PayloadTooLarge(f"append=True needs the whole save in the ring ({ring.size} bytes); "
                                      f"this one is {total}")
            return self._submit_in_pieces(abspath, values, fmt, fsync, level)

        deferred = {id(a): aligned(staged_bytes(a)) for a in arrays if defers(a)}
        if sum(deferred.values()) + total > ring.size:
            deferred = {}  # no room to stage: reorder during the copy, as small arrays do
        block = self.on_full == "block"
        staging = ring.alloc(sum(deferred.values()), block=block, timeout=self.timeout) if deferred else None
        try:
            base = ring.alloc(total, block=block, timeout=self.timeout)
        except BaseException:
            if staging is not None:
                ring.free(staging)
            raise
        offsets = {key: base + off for key, off in relative.items()}
        specs = [to_spec(n, v, offsets) for n, v in values.items()]
        seq = next(self._seq)
        fut: Future[SaveResult] = Future()
        fut.set_running_or_notify_cancel()
        request = proto.WriteRequest(seq, abspath, fmt, fsync, tuple(specs), level, mode, append)
        copying = any(a.is_cuda for a in arrays) or bool(deferred)
        with self._lock:
            self._pending[seq] = Pending(fut, base, abspath, fmt, holds=2 if copying else 1)
        try:
            cuda_items, reorders, at = [], [], staging
            for a in arrays:
                if a.is_cuda:
                    cuda_items.append((a, offsets[id(a)]))
                elif id(a) in deferred:
                    reorders.append((stage(a, ring.array, at), offsets[id(a)]))
                    at += deferred[id(a)]
                else:
                    copy_host(a, ring.array, offsets[id(a)])
            copies: list[Any] = [self._cuda().start(cuda_items)] if cuda_items else []
            if reorders:
                copies.append(HostReorder(reorders, ring, staging))
            copy = None if not copies else copies[0] if len(copies) == 1 else AllOf(copies)
            self._dispatch(request, copy, hold=copying)
        except BaseException:
            with self._lock:
                self._pending.pop(seq, None)
            ring.free(base)
            if staging is not None:
                ring.free(staging)
            raise
        return fut

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save made so far is on disk; raise if any failed."""
        with self._lock:
            futures = [p.future for p in self._pending.values()]
        done, not_done = _wait_with_progress(futures, timeout)
        if not_done:
            raise TimeoutError(f"flush: {len(not_done)} of {len(futures)} saves still pending "
                               f"after {timeout} s")
        # Every save that failed since the last flush(), including those that had already
        # failed (and so left _pending) before this call.
        with self._lock:
            errors, self._failed = self._failed, []
        if errors:
            raise FlushError(f"{len(errors)} saves failed since the last flush; first: {errors[0]}",
                             errors) from errors[0]

    def close(self, timeout: float | None = 60.0) -> None:
        """Wait up to ``timeout`` for pending saves, then release the ring and the daemon.

        Saves still pending after that fail with :class:`SpoolClosed`.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            futures = [p.future for p in self._pending.values()]
        wait(futures, timeout)
        self._fail_all(SpoolClosed(f"spool closed before the save finished (waited {timeout} s)"))
        self._teardown()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- internals -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosed("save() on a closed Spool")
        if self._broken is not None:
            raise self._broken

    def _dispatch(self, message: Any, copy: Any = None, hold: bool = False) -> None:
        """Send once ``copy`` (CUDA copies, host reorders) is done. While saves may still
        be copying, everything queues behind them, so saves to one path, a stream's steps
        and a big save's pieces reach the daemon in the order they were made. ``hold``:
        the save's region stays taken until the copy ends, even if the save fails first."""
        with self._order_lock:
            if copy is None and self._queued == 0:
                self._send(self._wire(message), self._payload(message))
                return
            self._queued += 1
        self._start_waiter()
        self._waitq.put((copy, message, hold))

    def _cuda(self) -> Any:
        if self._copier is None:
            from ._cuda import CudaCopier

            assert self._ring is not None
            self._ring.register_cuda()
            self._copier = CudaCopier(self._ring.array)
        return self._copier

    def _start_waiter(self) -> None:
        with self._order_lock:
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_loop, name="matspool-copy", daemon=True)
                self._waiter.start()

    def _wait_loop(self) -> None:
        while (item := self._waitq.get()) is not None:
            pending, request, hold = item
            try:
                if pending is not None:
                    pending.wait()
            except Exception as e:  # a CUDA error: the bytes never arrived
                self._resolve(request.seq, error=MatspoolError(f"copy into the ring failed: {e}"))
            else:
                self._send(self._wire(request), self._payload(request))
            finally:
                if hold:
                    self._release(request.seq)
                with self._order_lock:
                    self._queued -= 1

    def _release(self, seq: int) -> None:
        """A save's copy has ended: its region may go once the save is answered too."""
        with self._lock:
            p = self._pending.get(seq) or self._copying.pop(seq, None)
            if p is None:
                return
            p.holds -= 1
            free = p.holds == 0
        if free and self._ring is not None and p.offset >= 0:
            self._ring.free(p.offset)

    def _wire(self, message: Any) -> dict[str, Any]:
        """A save in pieces that already failed here (a copy failed, the ring timed out)
        must not be published with holes: its END becomes an abort."""
        if isinstance(message, End) and not message.abort:
            with self._lock:
                if message.seq not in self._pending:
                    message = End(message.seq, True)
        return message.to_wire()

    def _part_done(self, seq: object, offset: object) -> None:
        """A piece (or, offset None, the laid-out save's small variables) is written: its
        ring space may be reused while the rest of the save is still arriving."""
        with self._lock:
            p = self._pending.get(seq)  # type: ignore[arg-type]
            if p is None or p.parts is None:
                return
            if offset is None:
                offset, p.offset = p.offset, -1
            elif offset in p.parts:
                p.parts.discard(offset)  # type: ignore[arg-type]
            else:
                return
        assert self._ring is not None
        if offset >= 0:  # type: ignore[operator]
            self._ring.free(offset)  # type: ignore[arg-type]

    def _resolve(self, seq: int, result: SaveResult | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            p = self._pending.pop(seq, None)
            parts = list(p.parts) if p is not None and p.parts else []
            if p is not None and error is not None:
                if len(self._failed) < _MAX_KEPT_FAILURES:  # before the future completes:
                    self._failed.append(error)              # flush() waits on it
            if p is not None:
                p.holds -= 1
                if p.holds:  # answered (or failed) while its copy still runs: freed after it
                    self._copying[seq] = p
        if p is None:
            return
        if self._ring is not None:
            if p.offset >= 0 and not p.holds:
                self._ring.free(p.offset)
            for off in parts:
                self._ring.free(off)
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)  # type: ignore[arg-type]

    def _fail_all(self, error: MatspoolError) -> None:
        with self._lock:
            seqs = list(self._pending)
        for seq in seqs:
            self._resolve(seq, error=type(error)(str(error)))

    def _teardown(self) -> None:
        self._closed = True
        if self._waiter is not None:
            self._waitq.put(None)
            self._waiter.join()
        self._close_link()
        if self._embedded is not None:
            self._embedded.stop()
        if self._ring is not None:
            self._ring.close()

