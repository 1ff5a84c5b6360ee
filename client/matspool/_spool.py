"""The client: ``Spool.save()`` copies into the ring and returns a future at once.

Threads, and why each exists:
- the caller's thread: checks the variables, reserves ring space, copies host arrays
  (or queues the GPU copy) and hands the WRITE to the I/O thread. It never waits on
  the disk, and waits on the ring only by the ``on_full`` policy.
- the I/O thread: owns the ZeroMQ DEALER socket (sockets are not thread-safe), sends
  WRITEs and heartbeats, turns DONE/ERR into future results, frees ring space.
- the CUDA waiter (only once a CUDA tensor is saved): waits for each save's copy
  event, in order, then releases its WRITE; so the daemon never reads unfinished bytes.
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
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import zmq

from . import _protocol as proto
from ._convert import LAYOUTS, ONED_AS, Prepared, Value, copy_host, iter_arrays, prepare_value, to_spec
from ._curve import ClientKeys, is_tcp
from ._embedded import EmbeddedDaemon
from ._errors import (
    DaemonUnavailable,
    FlushError,
    MatspoolError,
    PayloadTooLarge,
    SpoolClosed,
    UnknownClient,
    error_from_code,
)
from ._matlab import V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name
from ._reorder import AllOf, HostReorder, defers, stage, staged_bytes
from ._ring import ALIGN, Ring

if TYPE_CHECKING:
    from ._stream import Stream

__all__ = ["DEFAULT_RING_BYTES", "SaveResult", "Spool"]

log = logging.getLogger("matspool")

DEFAULT_RING_BYTES: Final = int(os.environ.get("MATSPOOL_RING_BYTES", 256 << 20))
_FORMATS: Final = ("auto", "v5", "v7.3")
_ON_FULL: Final = ("block", "raise")


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a save's future resolves to once the file is complete under its final name."""

    path: str
    nbytes: int  # size of the file written
    format: str


@dataclass(slots=True)
class _Pending:
    future: Future[SaveResult]
    offset: int
    path: str
    format: str
    wire: list[Any] | None = None  # the WRITE's frames as sent, kept to re-send to a restarted daemon
    sent: bool = False
    parts: set[int] | None = None  # ring offsets of pieces in flight (a save larger than the ring)
    holds: int = 1  # the region is freed when the answer came and, if any, the copy into it ended


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


_LIVE: weakref.WeakSet[Spool] = weakref.WeakSet()


@atexit.register
def _close_live_spools() -> None:
    """Process exit without close(): finish what was saved rather than drop it."""
    for spool in list(_LIVE):
        spool.close()


@dataclass(frozen=True, slots=True)
class _End:
    """The last message of a save in pieces; ``abort`` throws the save away."""

    seq: int
    abort: bool

    def to_wire(self) -> dict[str, Any]:
        return {"op": "END", "seq": self.seq, "abort": self.abort}


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
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


_BATCH_BYTES: Final = proto.MAX_MESSAGE_BYTES // 2


def _send_batch(dealer: zmq.Socket, bodies: list[bytes]) -> None:
    """Saves queued together reach the daemon as one message: one receive there, not one
    per save, which is most of a small file's cost in the daemon's control loop."""
    if len(bodies) == 1:
        dealer.send_multipart([proto.TAG, bodies[0]])
    elif bodies:
        dealer.send_multipart([proto.TAG, b'{"op":"BATCH","msgs":[' + b",".join(bodies) + b"]}"])


class Spool:
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
        self._pending: dict[int, _Pending] = {}
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
        self._copying: dict[int, _Pending] = {}  # finished saves whose copy still runs

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
            self._ctx = zmq.Context.instance()
            # messages for the daemon, in order; the I/O thread is woken only when the
            # outbox was empty, so a burst of saves costs it one wake-up, not one each
            self._outbox: deque[tuple[str, int, list[Any]]] = deque()
            self._wake_lock = threading.Lock()
            inproc = f"inproc://matspool-{id(self)}"
            self._rx = self._ctx.socket(zmq.PULL)
            self._rx.bind(inproc)
            self._tx = self._ctx.socket(zmq.PUSH)
            self._tx.connect(inproc)
            self._welcome = threading.Event()
            self._io = threading.Thread(target=self._io_loop, name="matspool-io", daemon=True)
            self._io.start()
            self._send(self._hello_msg())
            self._await_welcome(connect_timeout)
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
    ) -> Future[SaveResult]:
        """Queue ``variables`` for ``path``; returns a future at once.

        Checks happen here (names, types, format limits); write failures arrive
        through the future. ``layout="matlab"`` keeps indices (``A(i,j) == x[i,j]``),
        ``"raw"`` stores C-order bytes as they are (MATLAB sees the dims reversed),
        ``"hwc"`` turns 3-d CHW / 4-d NCHW images into HxWxC(xN). ``compress``
        (default: the spool's) deflates in the daemon: True is level 3, or give 1-9.
        """
        _check_choice("format", format, _FORMATS)
        return self._submit(path, variables, format, layout, oned_as, fsync, compress, "write")

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
                mode: str) -> Future[SaveResult]:
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
        arrays = [a for v in values.values() for a in iter_arrays(v)]
        if fmt == "auto":
            fmt = "v7.3" if any(a.nbytes > V5_MAX_VARIABLE_BYTES for a in arrays) else "v5"
        relative, total = self._place(arrays)
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
            return self._submit_in_pieces(abspath, values, fmt, fsync, level)

        deferred = {id(a): _aligned(staged_bytes(a)) for a in arrays if defers(a)}
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
        request = proto.WriteRequest(seq, abspath, fmt, fsync, tuple(specs), level, mode)
        copying = any(a.is_cuda for a in arrays) or bool(deferred)
        with self._lock:
            self._pending[seq] = _Pending(fut, base, abspath, fmt, holds=2 if copying else 1)
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

    def _submit_in_pieces(self, abspath: str, values: dict[str, Value], fmt: str, fsync: bool,
                          level: int) -> Future[SaveResult]:
        """A save larger than the ring: its largest arrays travel in slabs.

        The file is laid out first (BEGIN, with the small variables in the ring), then
        each slab of a deferred array is copied in as ring space frees and written into
        its place (PART), then END renames the file into place. This call returns when
        the last slab is in the ring: for these saves the caller waits for the disk by as
        much as the save exceeds the ring.
        """
        ring = self._ring
        assert ring is not None
        if level:
            raise PayloadTooLarge(f"a compressed save must fit in the ring ({ring.size} bytes); "
                                  "raise ring_bytes or save uncompressed")
        budget = ring.size // 4
        names = list(values)
        deferred: dict[str, tuple[int, int]] = {}  # name -> (axis, planes per slab)
        rest = sum(a.nbytes for v in values.values() for a in iter_arrays(v))
        for name in sorted(names, key=lambda n: -sum(a.nbytes for a in iter_arrays(values[n]))):
            v = values[name]
            if rest <= budget or not isinstance(v, Prepared) or v.nbytes <= budget // 4:
                break
            axis = max(i for i, d in enumerate(v.dims) if d > 1)  # slabs along it are contiguous
            plane = v.nbytes // v.dims[axis]
            if plane > ring.size // 2:
                raise PayloadTooLarge(
                    f"variable {name!r}: one slab along its last dimension is {plane} bytes; a save "
                    f"in pieces needs a ring of at least twice that (ring_bytes={ring.size})")
            deferred[name] = (axis, max(1, budget // plane))
            rest -= v.nbytes
        if rest > ring.size // 2:
            raise PayloadTooLarge(f"this save's variables that cannot be split take {rest} bytes; "
                                  f"the ring holds {ring.size}: raise ring_bytes")
        small = [a for n, v in values.items() if n not in deferred for a in iter_arrays(v)]
        relative, total = self._place(small)
        base = ring.alloc(total, block=self.on_full == "block", timeout=self.timeout)
        offsets = {key: base + off for key, off in relative.items()}
        specs = [proto.VarSpec(n, v.dtype, v.dims, 0, v.nbytes, deferred=True)  # type: ignore[union-attr]
                 if n in deferred else to_spec(n, v, offsets) for n, v in values.items()]
        seq = next(self._seq)
        fut: Future[SaveResult] = Future()
        fut.set_running_or_notify_cancel()
        pending = _Pending(fut, base, abspath, fmt, parts=set())
        with self._lock:
            self._pending[seq] = pending
        abandon = True
        try:
            cuda_items = [(a, offsets[id(a)]) for a in small if a.is_cuda]
            for a in small:
                if not a.is_cuda:
                    copy_host(a, ring.array, offsets[id(a)])
            self._dispatch(proto.WriteRequest(seq, abspath, fmt, fsync, tuple(specs), 0, "begin"),
                           self._cuda().start(cuda_items) if cuda_items else None)
            for index, name in enumerate(names):
                if name in deferred:
                    self._send_slabs(seq, index, values[name], *deferred[name], pending)  # type: ignore[arg-type]
            abandon = False
        finally:
            self._dispatch(_End(seq, abandon))
        return fut

    def _send_slabs(self, seq: int, index: int, v: Prepared, axis: int, per: int, pending: _Pending) -> None:
        ring = self._ring
        assert ring is not None and pending.parts is not None
        plane = v.nbytes // v.dims[axis]
        for k in range(0, v.dims[axis], per):
            if pending.future.done():
                return  # failed already: the daemon's END answer says why
            cut = [slice(None)] * len(v.dims)
            cut[axis] = slice(k, k + per)
            slab = v.array[tuple(cut)]
            piece = Prepared(v.name, v.dtype, tuple(int(d) for d in slab.shape), slab, v.is_cuda)
            off = ring.alloc(piece.nbytes, block=self.on_full == "block", timeout=self.timeout)
            with self._lock:
                pending.parts.add(off)
            copy = None
            if v.is_cuda:
                copy = self._cuda().start([(piece, off)])
            else:
                copy_host(piece, ring.array, off)
            self._dispatch(proto.Part(seq, index, k * plane, off, piece.nbytes), copy)

    @staticmethod
    def _place(arrays: list[Prepared]) -> tuple[dict[int, int], int]:
        """Offsets (by id) relative to the save's ring region, each cache-line aligned."""
        offsets, off = {}, 0
        for a in arrays:
            offsets[id(a)] = off
            off += _aligned(a.nbytes)
        return offsets, off

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
        if isinstance(message, _End) and not message.abort:
            with self._lock:
                if message.seq not in self._pending:
                    message = _End(message.seq, True)
        return message.to_wire()

    def _send(self, msg: dict[str, Any], payload: list[memoryview] | tuple[()] = ()) -> None:
        item = (msg["op"], msg.get("seq", -1), [*proto.encode(msg), *payload])
        with self._wake_lock:
            self._outbox.append(item)
            if len(self._outbox) == 1:
                self._tx.send(b"")

    def _payload(self, message: Any) -> list[memoryview] | tuple[()]:
        """For a remote (tcp://) daemon, which cannot map our ring: the arrays as frames,
        zero-copy views of the ring, in the ring order the daemon expects."""
        if not self._remote or self._ring is None:
            return ()
        ring = self._ring.array
        if isinstance(message, proto.WriteRequest):
            spans = [(leaf.offset, leaf.nbytes) for v in message.vars for leaf in proto.leaves(v)
                     if not leaf.deferred and leaf.nbytes]
        elif isinstance(message, proto.Part):
            spans = [(message.offset, message.nbytes)]
        else:
            return ()
        return [memoryview(ring[off:off + n]) for off, n in spans]

    def _await_welcome(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._welcome.wait(0.05):
            if self._broken is not None:
                raise self._broken
            if self._embedded is not None and (rc := self._embedded.exit_status()) is not None:
                raise DaemonUnavailable(f"the embedded daemon exited with status {rc} during start-up")
            if time.monotonic() > deadline:
                raise DaemonUnavailable(f"no matspool daemon answered at {self.endpoint} within {timeout} s")

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

    def _on_message(self, dealer: zmq.Socket, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        instance = msg.get("instance")
        if op == "WELCOME":
            restarted = self._instance is not None and instance != self._instance
            self._instance, self._hello_sent = instance, False
            self._welcome.set()
            if restarted:
                self._resend(dealer)
        elif op == "PONG":
            if self._instance is not None and instance != self._instance and not self._hello_sent:
                self._hello(dealer)  # a new daemon on the same endpoint: register again
        elif op == "PART_DONE":
            self._part_done(msg.get("seq"), msg.get("offset"))
        elif op == "DONE":  # one save ({seq, nbytes}) or several ({done: [[seq, nbytes], ...]})
            answers = msg["done"] if "done" in msg else [[msg.get("seq"), msg.get("nbytes", 0)]]
            for seq, nbytes in answers:
                p = self._pending.get(seq)
                if p is not None:
                    self._resolve(seq, SaveResult(p.path, int(nbytes), p.format))
        elif op == "ERR":
            code, seq = str(msg.get("code")), msg.get("seq")
            if code == UnknownClient.code:  # the daemon restarted: the save is re-sent after HELLO
                if not self._hello_sent:
                    self._hello(dealer)
                return
            err = error_from_code(code, str(msg.get("message")))
            if isinstance(seq, int) and seq >= 0:
                self._resolve(seq, error=err)
            else:  # about the connection itself (e.g. the ring could not be mapped)
                self._broken = err
                self._fail_all(err)
        else:
            log.warning("matspool: ignoring unknown message %r from the daemon", op)

    def _hello_msg(self) -> dict[str, Any]:
        assert self._ring is not None
        if self._remote:  # the daemon is on another host: it gets payloads in frames
            return {"op": "HELLO", "remote": True, "ring": None, "ring_bytes": self._ring.size,
                    "pid": os.getpid()}
        return {"op": "HELLO", "ring": self._ring.name, "ring_bytes": self._ring.size, "pid": os.getpid()}

    def _hello(self, dealer: zmq.Socket) -> None:
        self._hello_sent = True
        dealer.send_multipart(proto.encode(self._hello_msg()))

    def _resend(self, dealer: zmq.Socket) -> None:
        """Send again every save the previous daemon accepted but never answered.

        Their bytes are still in the ring (space is freed only on an answer); a file the
        old daemon had already renamed into place is replaced by an identical one.
        """
        with self._lock:
            again = [p.wire for p in self._pending.values() if p.sent]
        for wire in again:
            dealer.send_multipart(wire, copy=False)
        if again:
            log.warning("matspool: (re)connected to the daemon; re-sent %d unanswered saves", len(again))

    def _forward(self, dealer: zmq.Socket) -> bool:
        """Pass the outbox's messages to the daemon; False on BYE."""
        with self._wake_lock:
            items = list(self._outbox)
            self._outbox.clear()
        batch: list[bytes] = []  # bodies of local WRITEs that go together as one BATCH
        size = 0
        for op, seq, frames in items:
            if op == "WRITE" and len(frames) == 2:  # no payload frames: a local client's
                if self._mark_sent(seq, frames):
                    if size + len(frames[1]) > _BATCH_BYTES:
                        _send_batch(dealer, batch)
                        batch, size = [], 0
                    batch.append(frames[1])
                    size += len(frames[1])
                continue
            _send_batch(dealer, batch)
            batch, size = [], 0
            if not self._forward_one(dealer, op, seq, frames):
                return False
        _send_batch(dealer, batch)
        return True

    def _mark_sent(self, seq: int, frames: list[Any]) -> bool:
        """Keep a WRITE's frames to re-send; False if the save failed or closed meanwhile."""
        with self._lock:
            p = self._pending.get(seq)
            if p is None:
                return False
            p.wire, p.sent = frames, True
            return True

    def _forward_one(self, dealer: zmq.Socket, op: str, seq: int, frames: list[Any]) -> bool:
        if op == "WRITE" and not self._mark_sent(seq, frames):
            return True
        dealer.send_multipart(frames, copy=False)
        return op != "BYE"

    def _io_loop(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        assert self._ring is not None
        dealer.setsockopt(zmq.ROUTING_ID, self._ring.name.encode())
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)  # every answer must get through, however many
        dealer.setsockopt(zmq.LINGER, 0)
        if self._curve is not None and is_tcp(self.endpoint):
            self._curve.apply(dealer)
        # a reconnect (a network blip on tcp://) may have lost answers in flight: the
        # daemon drops what it cannot deliver. Re-sending the unanswered saves then is safe:
        # it answers a seq it has written again, and ignores one it is still writing.
        monitor = dealer.get_monitor_socket(zmq.EVENT_CONNECTED)
        dealer.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._rx, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        connections = 0
        last_rx = last_ping = time.monotonic()
        silence_limit = self.timeout if self.timeout else 60.0
        try:
            while True:
                events = dict(poller.poll(int(self._heartbeat * 1000)))
                now = time.monotonic()
                if self._rx in events:
                    while self._rx.poll(0):
                        self._rx.recv()
                    if not self._forward(dealer):
                        return
                if dealer in events:
                    last_rx = now
                    while dealer.poll(0):
                        try:
                            self._on_message(dealer, proto.decode(dealer.recv_multipart()))
                        except Exception as e:  # e.g. a DONE whose seq is a list: this thread
                            # must live on, or every pending future would hang forever
                            log.warning("matspool: bad message from the daemon: %r", e)
                if monitor in events:
                    while monitor.poll(0):
                        monitor.recv_multipart()
                        connections += 1
                        if connections > 1:
                            self._resend(dealer)
                if now - last_ping >= self._heartbeat:
                    dealer.send_multipart(proto.encode({"op": "PING"}))
                    last_ping = now
                if self._embedded is not None and (rc := self._embedded.exit_status()) is not None:
                    self._broken = DaemonUnavailable(f"the embedded daemon exited with status {rc}")
                    self._fail_all(self._broken)
                    return
                if self.pending and now - last_rx > max(silence_limit, 3 * self._heartbeat):
                    self._fail_all(DaemonUnavailable(
                        f"no word from the daemon at {self.endpoint} for {now - last_rx:.1f} s"))
                    last_rx = now
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)

    def _teardown(self) -> None:
        self._closed = True
        if self._waiter is not None:
            self._waitq.put(None)
            self._waiter.join()
        io = getattr(self, "_io", None)
        if io is not None and io.is_alive():
            self._send({"op": "BYE"})  # the I/O thread forwards it to the daemon, then stops
            io.join(timeout=5)
        for name in ("_tx", "_rx"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._embedded is not None:
            self._embedded.stop()
        if self._ring is not None:
            self._ring.close()

