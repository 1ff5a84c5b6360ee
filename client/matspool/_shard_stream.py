"""Streams sharded over ranks: every rank appends its blocks, one file grows one global series.

Every rank of a torch.distributed group calls ``s = spool.stream(path)`` and then, each
step, ``s.append(u=Shard(local, offset, global_shape))`` (or a DTensor; plain values in the
same step are written by group rank 0). Each step is a sharded save (``_shard``: blocks
checked by rank 0, LAYOUT of a temporary with the step's global sizes, every rank's PLACEs,
coordinated over the group's c10d store) whose end is not a PUBLISH but a STEP: rank 0's
daemon adds the temporary's datasets to the stream as its next step (the first step
creates the file), under the stream's undo journal (``matspoold.sharded_stream``). So the
stream's file is written by one daemon only, a step is in it whole or not at all, and a
rank, a daemon or the coordination failing mid-step fails that step on every rank and
leaves every earlier step as it was.

Steps of one stream run one after another (step ``k + 1`` begins on a rank once step
``k``'s outcome is known there). Store keys (``_shard_keys``):
``matspool/sstream/<group>/<s>/<k>/``, ``s`` counting this process's sharded streams on
the group: every rank must start its sharded streams, and append to them, in the same
order, as for any collective. As for a sharded save, none is left once every rank has the
step's outcome, and each step's thread uses a store connection from the spool's pool
(``_shard_conns``: a clone per step was seen to take 5 s now and then).

A rank whose stream (``Stream.close``, or leaving its ``with`` on an error) or spool
(``Spool.close``, once its pending steps are over) is closed appends no further step:
:meth:`ShardedStream.end` says so for its next step (``_shard_coord.notice``: that step's
``blocks/<r>``, or its ``layout`` on rank 0), so the other ranks' step fails at once with a
ShardError naming the rank and the step, not after the timeout. Every rank then knows the
stream ended (rank 0's verdict says which rank closed: ``ended``): its later steps fail at
once without touching the store, and its own close says nothing more. When every rank
closes its stream after the same last step, each one's word is for the same step that
nobody makes, and the last one deletes them all.
A rank whose word is for a later step than the one the stream ended at (its ``with``
left on an error, that step in flight) deletes that later step's keys when it learns
the end (:meth:`ShardedStream.learn`): nobody else would.
A stream opened with ``group=`` is tracked from its open (:class:`Unstarted`), so a
close before its first step says so for step 0, its number taken then.

Threads: ``append_sharded`` runs in the caller's thread (checks, the ring snapshot); each
step then has a ``matspool-sstream`` thread of its own (``_shard._Job``'s rules), which
waits for the previous step's. A :class:`ShardedStream` is its stream's caller's, but
``vars`` (rank 0's record of the stream's variables), which step threads update one at a
time, and ``step``, ``ended`` and ``said``, which a step thread, the caller's and a closing spool's
thread touch: under ``lock``. ``_counters`` is shared under ``_lock``. ``Unstarted.end``
runs in the closing caller's thread (the stream's, or its spool's).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from . import _shard_keys as keys
from ._errors import InvalidOptionError, SpoolClosed
from ._msgshard import Layout, LayoutResult, ShardVar, StreamStep
from ._planner import level
from ._saves import SaveResult
from ._shard import _Job, _member, _start_job
from ._shard_blocks import Failed, ShardError
from ._shard_conns import Conns, conns, track
from ._shard_coord import delete, notice

if TYPE_CHECKING:
    from ._spool import Spool
    from ._stream import Stream

__all__ = ["ShardedStream", "Unstarted", "append_sharded"]

_lock = threading.Lock()
_counters: dict[str, itertools.count[int]] = {}
_KEEP: Final = "the stream keeps its earlier steps"
_EARLIER: Final = "every earlier step is in the stream"


@dataclass(eq=False)
class ShardedStream:
    """A stream's coordination state on this rank (see the module docstring)."""

    store: Any
    pool: Conns  # the store connections the steps' threads take in turn
    gname: str
    number: int
    rank: int
    size: int
    path: str
    step: int = 0
    vars: list[ShardVar] | None = None  # rank 0: the variables of the steps in the file (None: none yet)
    last: threading.Event | None = None  # set once the latest step's outcome is known
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: tuple[int, str] | None = None  # (step, why): a rank appends no step from this one on
    ended_here: bool = False  # this rank's stream or spool was closed (it said so)
    said: int | None = None  # the step this rank's word (``end``) is under, while it stands
    pid: int = field(default_factory=os.getpid)  # a forked child does not speak for this rank

    def end(self, closed: str) -> None:
        """This rank appends no further step (``closed``: its "Spool" or "stream" was
        closed): the others' next step fails at once (see the module docstring). Nothing
        to say when the stream already ended (every rank knows), or in a forked child."""
        if self.pid != os.getpid():
            return
        with self.lock:
            if self.ended is not None:
                return
            k = self.step
            self.step += 1
            why = f"rank {self.rank}'s {closed} was closed before it appended step {k}"
            self.ended, self.ended_here = (k, why), True
        prefix = keys.step_prefix(self.gname, self.number, k)
        notice(self.store, prefix, self.rank, self.size, self.error(k, why), why)
        with self.lock:  # an earlier step's end (``learn``) may have come meanwhile
            assert self.ended is not None
            stale = self.ended[0] < k
            if not stale:
                self.said = k
        if stale:
            self._withdraw(self.store, k)

    def learn(self, step: int, why: str, store: Any) -> None:
        """Rank 0's verdict: a rank's stream or spool was closed before ``step`` (``why``),
        so the stream ended there, on this rank too. A word this rank had said for a later
        step (it left its ``with`` on an error with ``step`` in flight) is then for a step
        that no rank makes or closes before: nobody would count it, so it goes here."""
        with self.lock:
            if self.ended is not None and self.ended[0] <= step:
                return
            self.ended = (step, why)
            stale, self.said = self.said, None
        if stale is not None and stale > step:
            self._withdraw(store, stale)

    def _withdraw(self, store: Any, k: int) -> None:
        """Delete every key of step ``k``, which no rank makes (the stream ended before it);
        each rank that said a word for it does so after its word, so the last one leaves none."""
        delete(store, keys.step_prefix(self.gname, self.number, k), self.size)

    def error(self, step: int, why: str) -> str:
        """The error of ``step`` of a stream that ended (``why``)."""
        return f"sharded stream {self.path!r}: step {step}: {why}, so it appends no later step; {_KEEP}"


@dataclass(eq=False)
class Unstarted:
    """A stream opened with ``group=`` (sharded before its first step): closed, or its spool
    closed, before that step, it still tells the others that its first step will not come
    (the stream's coordination state is made then, in the order its first append would)."""

    spool: Spool
    stream: Stream
    group: Any
    pid: int = field(default_factory=os.getpid)  # a forked child does not speak for this rank

    def end(self, closed: str) -> None:
        if self.pid != os.getpid():
            return
        stream = self.stream
        if stream._shards is None:
            try:
                stream._shards = _group_of(self.spool, self.group, stream.path)
            except Exception:  # noqa: BLE001 - the group is gone: nobody waits on it
                return
        stream._shards.end(closed)


def _group_of(spool: Spool, group: Any, path: str) -> ShardedStream:
    rank, size, store, gname = _member(group, "a sharded stream")
    with _lock:
        number = next(_counters.setdefault(gname, itertools.count()))
    state = ShardedStream(store, conns(spool, gname, store, rank, size), gname, number, rank, size, path)
    track(spool, state)  # a closing spool tells the others (``closed``)
    return state


def append_sharded(
    spool: Spool, stream: Stream, variables: Mapping[str, Any], group: Any
) -> Future[SaveResult]:
    """One step of a sharded stream (see the module docstring); its future at once."""
    layout, oned_as, fsync, compress = stream._opts
    if layout != "matlab":
        raise InvalidOptionError(f"a sharded stream takes layout='matlab' only, not {layout!r}")
    state = stream._shards
    if state is None:
        if stream.steps:
            raise InvalidOptionError(
                f"stream {stream.path}: its earlier steps were not sharded; a stream is sharded "
                "(a Shard or DTensor, or group=) from its first step on, or never"
            )
        state = stream._shards = _group_of(spool, group, stream.path)
    with state.lock:
        ended, here, k = state.ended, state.ended_here, state.step
        if ended is None:
            state.step += 1  # every rank counts every step, even one that fails here
    if here:
        raise SpoolClosed(f"append() on the sharded stream {stream.path} of a closed Spool")
    if ended is not None:  # no rank coordinates this step: fail here, the store untouched
        raise ShardError(state.error(k, ended[1]))
    prefix = keys.step_prefix(state.gname, state.number, k)
    job = _start_job(
        _StepJob,
        spool,
        variables,
        ("v7.3", oned_as, fsync),
        lambda why: (why, f"sharded stream {stream.path!r}: step {k}: {why}; {_KEEP}"),
        pool=state.pool,
        base=state.store,
        prefix=prefix,
        rank=state.rank,
        size=state.size,
        path=stream.path,
        stream=state,
        step=k,
        level=spool.compress if compress is None else level(compress),
    )
    after, done = state.last, threading.Event()
    state.last = done

    def run() -> None:
        if after is not None:
            after.wait()
        try:
            job.run()
        finally:
            done.set()

    threading.Thread(target=run, name=f"matspool-sstream-{state.number}-{k}", daemon=True).start()
    return job.save.future


@dataclass(eq=False, kw_only=True)
class _StepJob(_Job):
    """One step's coordination: a sharded save whose end is STEP, not PUBLISH."""

    stream: ShardedStream | None = None
    step: int = 0
    level: int = 0
    checked: list[ShardVar] | None = None  # rank 0: this step's variables, once checked

    def _what(self) -> str:
        return f"sharded stream {self.path!r}: step {self.step}"

    def _unknown(self) -> str:
        return f"whether the step was added is unknown; {_EARLIER}"

    def _said(self, text: str) -> str:
        """``text`` as this step's error (once)."""
        return text if text.startswith(self._what()) else f"{self._what()}: {text}"

    def _run(self) -> int:
        """As a sharded save's, with the errors this rank raises itself told as this
        stream step's (rank 0's verdicts are already); a step at or after one a closed
        rank never makes fails at once, the store untouched (no rank coordinates it)."""
        assert self.stream is not None
        with self.stream.lock:
            ended = self.stream.ended
        if ended is not None and self.step >= ended[0]:
            raise ShardError(self.stream.error(self.step, ended[1]))
        try:
            return super()._run()
        except ShardError as e:
            text = str(e)
            if text.endswith((_KEEP, _EARLIER)):
                raise
            if "no result from rank 0" in text:  # it may have asked for the STEP
                text = text.replace("nothing was published", self._unknown())
            else:
                text = f"{text}; {_EARLIER}"
            raise ShardError(text) from None

    def _put(self, key: str, value: dict[str, Any]) -> None:
        """As a sharded save's, with its errors told as this stream step's."""
        if "error" in value:
            text = str(value["error"]).replace(f"sharded save to {self.path!r}: ", "")
            text = text.replace("did not call save()", "did not call append()")
            value = {**value, "error": text if text.endswith(_KEEP) else f"{text}; {_KEEP}"}
        super()._put(key, value)

    def _refused(self, laid: dict[str, Any]) -> None:
        """Rank 0 said a rank's stream or spool was closed before this step: the stream
        ended, on this rank too (its later steps fail at once)."""
        if "closed" in laid and self.stream is not None:
            self.stream.learn(self.step, str(laid["closed"]), self.store)

    def _laid(self, fmt: str, shard_vars: list[ShardVar]) -> dict[str, Any]:
        """Rank 0, the blocks checked: the step checked against the stream's earlier ones,
        its temporary laid out (always v7.3); what every rank is told."""
        self._check_step(shard_vars)
        laid = self._ask(Layout(next(self.spool._seq), self.path, "v7.3", tuple(shard_vars)))
        assert isinstance(laid, LayoutResult)
        self.checked = shard_vars
        return {"tmp": laid.path, "offsets": laid.offsets}

    def _check_step(self, got: list[ShardVar]) -> None:
        """Every variable has elements, and a later step has the first one's variables."""
        for v in got:
            if 0 in v.dims:
                raise Failed(
                    f"variable {v.name!r} is empty ({'x'.join(map(str, v.dims))}); a stream variable "
                    "needs at least one element per step"
                )
        assert self.stream is not None
        with self.stream.lock:
            want = self.stream.vars
        if want is None or got == want:
            return
        if [v.name for v in got] != [v.name for v in want]:
            raise Failed(
                f"this step has variables {[v.name for v in got]}, the stream {[v.name for v in want]}"
            )
        for g, w in zip(got, want, strict=True):
            if g != w:
                raise Failed(
                    f"variable {g.name!r} is {g.dtype} of size {list(g.dims)} in this step, "
                    f"{w.dtype} of size {list(w.dims)} in the stream's earlier steps"
                )

    def _not_ended(self, errors: list[str]) -> str:
        return self._said("; ".join(errors))

    def _end(self) -> int:
        """Rank 0, every rank done: the temporary becomes the stream's next step."""
        assert self.tmp is not None and self.stream is not None
        with self.stream.lock:  # no step in the file yet (the first failed?): this one creates it
            create = self.stream.vars is None
        step = StreamStep(next(self.spool._seq), self.path, self.tmp, create, self.fsync, self.level)
        done = self._ask(step)
        with self.stream.lock:
            if create:
                self.stream.vars = self.checked
        return done.nbytes
