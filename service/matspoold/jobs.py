"""Jobs: what the writer threads do with one WRITE, PART or END.

A job reads its arrays in place, as numpy views over the client's sealed ring (or over
the frames a remote client sent, or over the bytes copied out of a ``/dev/shm`` ring,
which cannot be sealed and so is never mapped: ``ringio``; a large plain array of such a
ring goes as a ``shmspan.ShmSpan`` the kernel copies into the file), and hands them to a writer:
a whole file (``write_atomic``), a stream step (the stream writer's ``append``), or a
save arriving in pieces (a ``Session``: laid out at ``begin``, filled by each PART,
renamed into place at END).

Threads: ``JobRunner.run`` runs on writer threads, several at once, but never two jobs of
one path at a time (the scheduler orders them). ``sessions`` is shared: a writer adds a
save's session at ``begin`` and takes it at END; the control thread aborts the sessions
of a client it drops, which happens only when that client has no job in flight.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from matspool import _protocol as proto
from matspool._errors import MatspoolError, ProtocolError, WriteFailed

from .paths import resolve_target
from .ringio import PREFAULT_MIN_BYTES, ShmRing, prefault
from .sessions import Client
from .shmspan import ShmSpan, part_span, spans
from .writers import WRITERS, Session, write_atomic
from .writers._files import UNNAMED_MAX_BYTES
from .writers._values import materialize

__all__ = ["Job", "JobRunner", "Source", "in_ring", "payload_of"]

log = logging.getLogger("matspoold")


@dataclass(eq=False, slots=True)
class Job:
    """One unit of writer work: a whole save, a stream step, or a piece of a save."""

    client: Client
    request: proto.WriteRequest
    kind: str = "write"  # or "begin", "part", "end" for a save that arrives in pieces
    part: proto.Part | None = None
    payload: dict[int, memoryview] | None = None  # a remote client's arrays, by ring offset
    abort: bool = False  # an "end" that throws the save away

    @property
    def ring_bytes(self) -> int:
        """Payload bytes of the ring this job reads."""
        if self.part is not None:
            return self.part.nbytes
        if self.kind == "end":
            return 0
        total = 0
        for v in self.request.vars:  # plain arrays (most saves) without building leaves
            if type(v) is not proto.VarSpec:
                return sum(leaf.nbytes for leaf in in_ring(self.request))
            if not v.deferred:
                total += v.nbytes
        return total


def in_ring(request: proto.WriteRequest) -> list[proto.VarSpec]:
    """The arrays of ``request`` whose bytes are in the ring now (not deferred to PARTs)."""
    return [leaf for v in request.vars for leaf in proto.leaves(v) if not leaf.deferred]


Source = mmap.mmap | dict[int, memoryview]  # a local client's ring, or a remote one's frames


#: a save's dtype strings (STORED_DTYPES' keys) as dtypes; writer threads share it
#: through single dict operations (atomic under the GIL)
_DTYPES: dict[str, np.dtype] = {}


def _array(src: Source, spec: proto.VarSpec) -> np.ndarray:
    """A read-only column-major view of the ring (or of the frame that carried the array
    from a remote client): the writers read it in place."""
    dt = _DTYPES.get(spec.dtype)
    if dt is None:
        dt = _DTYPES[spec.dtype] = np.dtype(spec.dtype)
    if spec.nbytes == 0:
        return np.zeros(spec.dims, dtype=dt, order="F")
    view: np.ndarray
    if isinstance(src, dict):
        view = np.ndarray(spec.dims, dtype=dt, buffer=src[spec.offset], order="F")
    else:
        view = np.ndarray(spec.dims, dtype=dt, buffer=src, offset=spec.offset, order="F")
    return view


def _materialize(mm: Source, node: proto.Tree) -> Any:
    """A struct/cell/char/sparse tree as the values the writers lay out (writers/_values.py)."""
    return materialize(node, lambda spec: _array(mm, spec))


def _views(job: Job) -> list[tuple[proto.Variable, Any]]:
    ring = job.client.mm
    src = job.payload if job.payload is not None else ring
    assert src is not None  # a local client's ring stays open while it has jobs
    spanned: dict[str, ShmSpan] = {}
    if isinstance(src, ShmRing):  # not sealed, so never mapped: the kernel copies large
        if job.kind == "write":  # arrays into the file (shmspan), the rest is copied out
            spanned = spans(job.request, src.fd)
        # by identity, not offset: an array sharing a span's offset is still copied out
        taken = {id(v) for v in job.request.vars if v.name in spanned}
        src = src.payload(leaf for leaf in in_ring(job.request) if id(leaf) not in taken)
    elif isinstance(src, mmap.mmap):  # a sealed ring: its pages mapped in one call, not by faults
        arrays = [v for v in job.request.vars if type(v) is proto.VarSpec]
        if len(arrays) == len(job.request.vars):  # arrays only (most saves): no tree to walk
            out: list[tuple[proto.Variable, Any]] = []
            for v in arrays:
                if not v.deferred and v.nbytes >= PREFAULT_MIN_BYTES:
                    prefault(src, v.offset, v.nbytes)
                out.append((v, None if v.deferred else _array(src, v)))
            return out
        for leaf in in_ring(job.request):
            prefault(src, leaf.offset, leaf.nbytes)
    return [
        (
            v,
            None
            if isinstance(v, proto.VarSpec) and v.deferred
            else spanned[v.name]
            if v.name in spanned
            else _array(src, v)
            if isinstance(v, proto.VarSpec)
            else _materialize(src, v.tree),
        )
        for v in job.request.vars
    ]


def payload_of(request: proto.WriteRequest, frames: list[memoryview]) -> dict[int, memoryview]:
    """A remote WRITE's payload frames, matched to its arrays (ring order) and checked."""
    want = in_ring(request)
    want = [leaf for leaf in want if leaf.nbytes]
    if len(frames) != len(want):
        raise ProtocolError(f"{len(want)} payload frames expected, got {len(frames)}")
    for leaf, frame in zip(want, frames, strict=True):
        if len(frame) != leaf.nbytes:
            raise ProtocolError(f"payload frame for {leaf.name!r} is {len(frame)} bytes, not {leaf.nbytes}")
    out: dict[int, memoryview] = {}
    for leaf, frame in zip(want, frames, strict=True):  # arrays sharing an offset: the longest
        if len(frame) > len(out.get(leaf.offset, b"")):
            out[leaf.offset] = frame
    return out


class JobRunner:
    """Runs jobs on the writer threads; every failure comes back as the job's error."""

    def __init__(self, roots: Sequence[str], write_delay: float = 0.0) -> None:
        self.roots = tuple(roots)
        self.write_delay = write_delay  # a deliberately slow disk, for overload tests
        self.sessions: dict[tuple[bytes, int], Session] = {}

    def run(self, job: Job) -> tuple[int | None, BaseException | None]:
        """Bytes written (None for a piece or a layout) and the failure, if any."""
        try:
            if self.write_delay:
                time.sleep(self.write_delay)
            execute = getattr(job, "execute", None)  # a sharded save's step (sharded.ShardJob)
            if execute is not None:
                return execute(self.roots), None
            return (self.run_piece(job) if job.kind in ("part", "end") else self.run_file(job)), None
        except MatspoolError as e:
            return None, e
        except OSError as e:
            error = WriteFailed(f"cannot write {job.request.path!r}: {e.strerror or e}")
            error.__cause__ = e  # its errno goes into the ERR message
            return None, error
        except Exception as e:
            log.exception("writer failed on %s", job.request.path)
            return None, WriteFailed(f"cannot write {job.request.path!r}: {type(e).__name__}: {e}")

    def forget(self, client: Client) -> None:
        """Abort the saves in pieces ``client`` began and will never end (it is dropped)."""
        for seq in client.begun:
            session = self.sessions.pop((client.ident, seq), None)
            if session is not None:
                session.abort()

    def abort_all(self) -> None:
        """At exit: saves in pieces never ended leave no temporary file."""
        for session in self.sessions.values():
            session.abort()
        self.sessions.clear()

    def run_file(self, job: Job) -> int | None:
        """A whole save, a stream step, or the layout of a save whose pieces follow."""
        req = job.request
        # a small whole file without fsync: through an unnamed temporary (_files.Temporary),
        # which is linked in (never over a directory): the name is checked only if taken
        unnamed = (
            job.kind == "write"
            and req.mode == "write"
            and not req.fsync
            and not req.append
            and job.ring_bytes <= UNNAMED_MAX_BYTES
        )
        # the directory, open below a root
        with resolve_target(req.path, self.roots, check=not unnamed) as final:
            views = _views(job)
            if job.kind == "begin":  # the session keeps its own duplicate of the directory
                session = Session.begin(final, req.format, views, req.fsync)
                self.sessions[(job.client.ident, req.seq)] = session
                return None
            if req.mode == "append":
                return WRITERS["stream"].append(final, views, fsync=req.fsync)
            fmt = "stream" if req.mode == "create" else req.format
            return write_atomic(
                final, fmt, views, fsync=req.fsync, compress=req.compress, append=req.append, unnamed=unnamed
            )

    def run_piece(self, job: Job) -> int | None:
        """Write one piece, or finish the file; after a failure, pieces are let go quietly
        (the save's ERR has gone out) and END answers with that failure."""
        key = (job.client.ident, job.request.seq)
        session = self.sessions.get(key)
        if job.kind == "end":
            self.sessions.pop(key, None)
            if session is not None and session.error is None and job.abort:
                session.abort()
                raise WriteFailed(
                    f"the client abandoned the save to {job.request.path!r}; nothing was written"
                )
            if session is None:
                raise WriteFailed(f"cannot write {job.request.path!r}: the save failed before its end")
            if session.error is not None:
                raise session.error
            return session.end()
        part = job.part
        assert part is not None
        if session is None or session.error is not None:
            return None
        try:
            data: np.ndarray | ShmSpan | None
            if job.payload is not None:
                data = np.frombuffer(job.payload[part.offset], np.uint8)
            elif isinstance(job.client.mm, ShmRing):  # never mapped: spliced, or copied out
                mm = job.client.mm
                data = None if session.splits(part.var) else part_span(mm.fd, part.offset, part.nbytes)
                if data is None:
                    data = np.frombuffer(mm.read(part.offset, part.nbytes), np.uint8)
            else:
                assert job.client.mm is not None  # a local client: its sealed ring is mapped
                prefault(job.client.mm, part.offset, part.nbytes)
                data = np.frombuffer(job.client.mm, np.uint8, part.nbytes, part.offset)
            session.write(part.var, part.start, data)
        except BaseException as e:
            session.error = (
                e
                if isinstance(e, MatspoolError)
                else WriteFailed(f"cannot write {job.request.path!r}: {getattr(e, 'strerror', None) or e}")
            )
            if session.error is not e:
                session.error.__cause__ = e  # keeps the errno for the END's ERR
            session.abort()
            raise session.error from e
        return None
