"""``Heap``: a connection to one slitter instance, and the client's slow path.

Attaching maps the instance's tables read-only, the allocation bitmap and
this client's own rack read-write, and the arena; the native fast path then
works on those mappings alone.  The slow path (binding threads, refills,
flushes, errors) lives here and talks to the daemon through ``_transport``.
A forked child gets a fresh rack on its first slow path, so no object is
ever cached twice.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys
import threading
import time
import weakref
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from slitter import _fastpath, errors
from slitter import address as _address
from slitter._native import ffi, lib
from slitter._transport import Transport
from slitter.alloc_class import Class
from slitter.channel import DEFAULT_CAPACITY, Channel
from slitter.protocol import ERROR_KINDS, POLICIES, U64, ErrorCode, Op
from slitter.shm import RW, GuardApplier, Mapping, open_segment

log = logging.getLogger("slitter")

_OPEN_HEAPS: weakref.WeakSet[Heap] = weakref.WeakSet()
_object_size = lib.slitter_object_size_key
_NOT_A_U48 = -1 - lib.SLITTER_ERR_FOREIGN_ADDRESS
_ORPHANS: list[object] = []  # a forked child's inherited transports: never touched, never freed
#: How long an abandoned attach's ABANDON may wait to be delivered (Transport.send_once).
ABANDON_LINGER_MS = 250


def _filled(out: array, start: int) -> int:
    """How many of ``out`` are handles: they fill it in order from 0, and no handle is 0."""
    try:
        return out.index(0, start)
    except ValueError:
        return len(out)


def _in_use(method):
    """A slow-path method: it runs only on an open heap, and ``close`` waits for it before unmapping.

    The slow path reads the mappings (guard pages, class names, the view
    the checks use) and the transport; a thread still in it when another
    closes the heap would touch them after they are gone.  A thread is
    entered in ``_inside`` (deque append and remove are atomic) before it
    looks at ``_closed``, and ``close`` sets ``_closed`` before it waits
    for ``_inside`` to empty, so one of the two always sees the other.  A
    close that had to wait for this very thread (``_close_pending``) is
    finished when the thread leaves its outermost slow-path call.
    """
    @functools.wraps(method)
    def guarded(self: Heap, *args: Any, **kwargs: Any) -> Any:
        me = threading.get_ident()
        inside = self._inside
        inside.append(me)
        try:
            if self._closed:
                raise self._closed_error()
            return method(self, *args, **kwargs)
        finally:
            inside.remove(me)
            if self._close_pending and me not in inside:
                self._finish_pending_close()

    return guarded


class Heap:
    """A connection to slitterd.  Use ``slitter.connect()``; close it, or use ``with``.

    ``view(handle) -> memoryview``: a writable memoryview of exactly the
    object's size.  Raises ForeignAddress or InteriorPointer when ``handle``
    is not an object start.  An attribute that holds a C callable, as
    ``Class.allocate`` is: the checks and the slice with no Python frame
    (doc/fast_path.md); the rest comes back to ``_view_slow``.
    """

    view: Callable[[int], memoryview]

    def __init__(self, address: str | None = None, *, name: str = "", timeout: float = 10.0,
                 policy: str | None = None) -> None:
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.address = _address.socket_path(address or _address.default_address())
        self.name = name
        #: This client's error policy; None defers to each class's.
        self.policy = policy
        self._timeout = timeout
        self._client = ffi.new("struct slitter_client *")
        self._view = ffi.addressof(self._client[0], "view")
        self._fresh_thread_state()
        self._data: Mapping | None = None
        self._tables = self._live_map = self._rack = self._shelf = None
        self._guards: GuardApplier | None = None
        self._view_key: int | None = None
        #: Native key per class id: registering a class again reuses it (keys are never freed).
        self._class_keys: dict[int, int] = {}
        self._transport: Transport | None = None
        #: Extra fields of the requests sent ahead (see _attach).
        self._ahead_flags: dict[str, bool] = {}
        self._closed = False
        self._attach()
        _OPEN_HEAPS.add(self)

    # -- attach / detach -------------------------------------------------

    def _attach(self) -> None:
        transport = Transport(self.address, self._timeout)
        pid, nonce = os.getpid(), secrets.randbits(64) | 1
        try:
            reply = transport.call(Op.ATTACH, pid=pid, name=self.name[:64], nonce=nonce)
        except errors.DaemonUnavailable:
            # No reply in time, but the daemon may have the attach queued, or have answered just too late:
            # undo it, or it holds a rack for as long as this process lives (doc/protocol.md, abandon).
            transport.send_once(Op.ABANDON, ABANDON_LINGER_MS, pid=pid, nonce=nonce)
            transport.close()
            raise
        except BaseException:
            transport.close()
            raise
        if reply.get("layout_version") != lib.SLITTER_LAYOUT_VERSION:
            try:
                transport.call(Op.DETACH, client=reply["client"], token=reply["token"])
            finally:
                transport.close()
            raise errors.ProtocolError(f"slitterd at {self.address} serves shared-memory layout version "
                                       f"{reply.get('layout_version')}; this client maps version "
                                       f"{lib.SLITTER_LAYOUT_VERSION}: upgrade the older of the two")
        transport.patient = True  # attached: from now on, wait out daemon restarts
        self._transport = transport
        self._client_id, self._token = reply["client"], reply["token"]
        # Requests sent ahead ask for no reply, if this daemon knows the field (an older one refuses it).
        self._ahead_flags = {"reply": False} if "reply" in reply.get("features", ()) else {}
        self.instance = reply["instance"]
        meta_path, data_path = _address.segment_paths(self.instance)
        # A forked child re-attaches: the tables, live map and arena it inherited
        # are the same segments, still mapped; only the rack is its own.
        meta_fd = open_segment(meta_path)
        try:
            if self._tables is None:
                # Tables read-only; every metadata mapping between guard pages.
                self._tables = Mapping(meta_fd, reply["tables_end"], lib.PROT_READ, guarded=True)
                self._live_map = Mapping(meta_fd, reply["live_map_bytes"], RW, reply["live_map_off"],
                                         noreserve=True, guarded=True)
                self._shelf = Mapping(meta_fd, reply["shelf_bytes"], RW, reply["shelf_off"], guarded=True)
            self._rack = Mapping(meta_fd, reply["rack_size"], RW, reply["rack_offset"], guarded=True)
        finally:
            os.close(meta_fd)
        header = ffi.cast("struct slitter_header *", self._tables.ptr)
        if self._data is None:
            data_fd = open_segment(data_path)
            try:
                self._data = Mapping(data_fd, reply["arena_size"], RW, noreserve=True)
            finally:
                os.close(data_fd)
            runs = ffi.cast("struct slitter_run *", self._tables.ptr + header.run_table_off)
            self._guards = GuardApplier(header, runs, self._data)
            self._classes_table = ffi.cast("struct slitter_class *", self._tables.ptr + header.class_table_off)
        err = lib.slitter_client_open(self._client, self._tables.ptr, self._live_map.ptr,
                                      ffi.cast("struct slitter_rack *", self._rack.ptr), reply["rack_index"],
                                      self._data.ptr, ffi.cast("struct slitter_shelf *", self._shelf.ptr))
        if err:
            raise errors.LimitExceeded(f"cannot open a client of {self.address}: {os.strerror(err)}")
        _BY_CLIENT[int(ffi.cast("uintptr_t", self._client))] = self
        if self._view_key is None:
            self._view_key = lib.slitter_key_new(self._client, 0)
            # One memoryview of the whole arena, held by the View (``view.arena``, None once
            # closed): a view is a checked slice of it.  It owns the mapping, so views outlive
            # close() safely.
            data = self._data
            self.view = _fastpath.View(self._view_key, self)
            self.view.arena = memoryview(ffi.buffer(ffi.gc(data.ptr, lambda _p, _keep=data: None), data.length))
        self._apply_guards()
        self._pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        """The parent's rack and socket are not ours: drop both without touching them."""
        lib.slitter_client_forked(self._client)
        if self._rack is not None:
            self._rack.close()
        _ORPHANS.append(self._transport)
        self._transport = None
        self._fresh_thread_state()  # the parent's threads, their locks and their close, are not here

    def _fresh_thread_state(self) -> None:
        """What this process's threads share about the heap: no thread inside it, no close under way."""
        self._lock = threading.RLock()
        self._inside: deque[int] = deque()  # the thread of each slow-path call under way (_in_use)
        self._close_pending = False  # close() was called from inside this heap on its own thread
        self._closer = (0, 0)  # (pid, thread) of the close under way, and _detached set once it is done
        self._detached = threading.Event()

    def _closed_error(self) -> errors.SlitterError:
        return errors.SlitterError(f"the heap of {self.address} is closed")

    def _ensure_attached(self) -> None:
        if self._closed:
            raise self._closed_error()
        if self._transport is None:
            with self._lock:
                if self._closed:  # closed by another thread while this one waited for the lock
                    raise self._closed_error()
                if self._transport is None:
                    self._attach()

    def _apply_guards(self) -> None:
        guards = self._guards
        if guards.applied != guards.header.nruns:
            with self._lock:
                guards.apply()
                self._client.guards_applied = guards.applied  # what the native view check compares

    def close(self) -> None:
        """Detach: the daemon takes back every cached object.  Idempotent.

        Other threads may still be using the heap: from the moment ``close``
        starts, their calls raise SlitterError ("closed"), and it detaches
        only once none of them is inside the heap any more (a slow path
        waiting for the daemon is waited for).  Called from inside one of
        the heap's own calls on the same thread (a signal handler, say), it
        cannot wait for that call: the heap is closed at once, and it
        detaches when that call has left the heap (at the end of a slow
        path, else at the next call on the heap, else at the process's
        exit).  Otherwise it returns detached, also when another thread's
        close was under way.  Views already taken stay valid until they
        are dropped.
        """
        thread = threading.get_ident()
        me = (os.getpid(), thread)
        with self._lock:
            first = not self._closed
            self._closed = True  # no slow path starts from now on (_in_use)
            if first:
                self._closer = me
                # Nor does any fast path: every thread's next native call finds
                # epoch 0 and leaves for the slow path, which raises.  This comes
                # before the detach, whose reclaim frees what the rack caches: a
                # thread allocating from its magazine meanwhile would hold an
                # object the depot also has.  Native calls hold the GIL, so none
                # is running now, except inside a hook: that one runs Python,
                # and when it returns its native frame uses the rack again.
                lib.slitter_client_close(self._client)
                # Called from inside the heap on this thread: deferred, decided
                # here under the lock, so a second closer sees it (_await_close).
                self._close_pending = thread in self._inside or bool(lib.slitter_hooked_here(self._client))
                deferred = self._close_pending
        if not first:
            if thread not in self._inside and not lib.slitter_hooked_here(self._client):
                self._await_close(me)
            return
        if not deferred:
            self._detach_and_unmap()

    def _await_close(self, me: tuple[int, int]) -> None:
        """A later close() from outside the heap: finish a deferred close, or wait for the one under way.

        Not the close of this very thread (a signal handler interrupted it),
        nor a parent's (this is a forked child): neither would ever finish.
        """
        while not self._detached.is_set():
            self._finish_pending_close()
            closer = self._closer
            if closer[0] != me[0] or closer == me:
                return
            self._detached.wait(0.05)  # and look again: a detach interrupted meanwhile is pending again

    def _finish_pending_close(self) -> None:
        """The close this thread could not finish from inside the heap: finish it, now that it has left."""
        with self._lock:
            if not self._close_pending or lib.slitter_hooked_here(self._client):
                return
            self._closer = (os.getpid(), threading.get_ident())  # first: a signal handler here must not wait
            self._close_pending = False
        self._detach_and_unmap()

    def _detach_and_unmap(self) -> None:
        """Once no thread is inside the heap: detach, close the socket, unmap; then let other closers return.

        Hooks never block; a slow path under way may wait for the daemon.
        Interrupted (KeyboardInterrupt, say), the close is pending again, for
        a waiting or a later close() to finish.
        """
        try:
            while self._inside or self._client.in_hook:
                time.sleep(0.0005)
            lib.slitter_client_close(self._client)  # again: nothing may have reopened it meanwhile
            _OPEN_HEAPS.discard(self)
            transport = self._transport
            if transport is not None:
                try:
                    transport.call(Op.DETACH, client=self._client_id, token=self._token)
                except errors.SlitterError as exc:
                    # UNKNOWN_CLIENT: a detach sent again after a lost reply; the first one got through.
                    if getattr(exc, "code", None) is not ErrorCode.UNKNOWN_CLIENT:
                        log.warning("detach from %s failed: %s", self.address, exc)
                transport.close()
                self._transport = None
            for mapping in (self._rack, self._shelf, self._live_map, self._tables):
                if mapping is not None:
                    mapping.close()
            self._data = self.view.arena = None  # the arena is unmapped when the last view goes
        except BaseException:
            self._close_pending = True
            raise
        self._detached.set()

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------

    def _class_key(self, class_id: int, name: str) -> int:
        """This heap's native key for ``class_id``, made on first use."""
        key = self._class_keys.get(class_id)
        if key is None:
            key = lib.slitter_key_new(self._client, class_id)
            if key < 0:
                raise errors.LimitExceeded(f"class '{name}': this process has made every native class key")
            self._class_keys[class_id] = key
        return key

    @_in_use
    def register_class(self, name: str, size: int, *, zero_init: bool = False, policy: str | None = None,
                       cap: int | None = None) -> Class:
        """The class ``name`` of ``size``-byte objects, created on first registration.

        Idempotent for the same spec.  ``policy`` ("raise", "log" or "abort")
        is the class's error policy for every client; it is set once.  ``cap``
        limits the objects the class may ever carve: past it, allocate raises
        OutOfMemory for the caller alone.

        Raises:
            ClassConflict: ``name`` exists with another size, zero_init or policy.
        """
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool):
            raise TypeError("register_class(name: str, size: int, zero_init: bool)")
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self._ensure_attached()
        reply = self._call(Op.REGISTER_CLASS, name=name, size=size, zero_init=bool(zero_init), policy=policy or "",
                           cap=cap or 0)
        cls = Class(self, reply["class_id"], name, size, reply["stride"], reply["zero_init"], reply["policy"])
        return cls

    def channel(self, capacity: int = DEFAULT_CAPACITY) -> Channel:
        """A new, empty channel of ``capacity`` handles (a power of two): pass ``.handle`` to the other side.

        The channel is an object of the arena (class ``slitter.channel.N``);
        ``Channel.release`` gives it back.
        """
        return Channel._create(self, capacity)

    def open_channel(self, handle: int) -> Channel:
        """The channel whose handle another process passed over.

        Raises:
            ForeignAddress, InteriorPointer: ``handle`` is not an object start.
            ClassMismatch: it is an object of a class that is not a channel's.
            DoubleFree: the channel was released.
        """
        return Channel._open(self, handle)

    @property
    def arena(self) -> memoryview:
        """The whole data segment, writable: the object of handle ``h`` is ``arena[h:h + size]``.

        Unchecked, as a C pointer is: a write through it may reach past an
        object, or into a released one.  Guard pages still fault.  Use it for
        the hot loop over handles that ``Class.check`` or ``Class.views``
        (one native call per batch) or ``view`` has checked.  It stays
        mapped while any view of it is alive, after ``close`` too.
        """
        arena = self.view.arena
        if arena is not None and lib.slitter_arena_ready(self._client):
            return arena
        return self._arena_slow()

    @_in_use
    def _arena_slow(self) -> memoryview:
        """``arena`` when the heap is closed, forked or has guard pages to protect first."""
        self._ensure_attached()
        if self.view.arena is None:
            raise self._closed_error()
        self._apply_guards()
        return self.view.arena

    def _view_other(self, handle: int) -> memoryview:
        """``view(handle)`` of anything but an int in [0, 2**48): Python's rules, then the same checks.

        A negative or too big int is a ForeignAddress, a bool or another int
        subclass is taken as its int value, anything else is a TypeError.
        """
        try:
            size = _object_size(handle << 16 | self._view_key)
        except OverflowError:
            size = _NOT_A_U48
        arena = self.view.arena
        if size > 0 and arena is not None:
            return arena[handle:handle + size]
        return self._view_slow(handle, size)

    @_in_use
    def _view_slow(self, handle: int, size: int) -> memoryview:
        if self.view.arena is None or self._closed:
            raise self._closed_error()
        if size == lib.SLITTER_VIEW_DETACHED:  # a forked child: get its own rack first
            self._ensure_attached()
            return self.view(handle)
        if size == lib.SLITTER_VIEW_GUARDS:
            self._apply_guards()
            return self.view(handle)
        _ptr, class_id, kind = _fastpath.locate(self._view, handle)
        owner = self._class_name(class_id) if class_id else None
        raise _fastpath.release_error(kind, handle, owner, owner, "viewed in")

    @_in_use
    def stats(self) -> dict[str, Any]:
        """{"instance": {...}, "classes": {name: {...}}, "clients": [...]} from the daemon."""
        self._ensure_attached()
        reply = self._call(Op.STATS)
        return {k: reply[k] for k in ("instance", "classes", "clients")}

    @_in_use
    def audit(self, since: int = 0, limit: int = 1000) -> dict[str, Any]:
        """The daemon's audit log after sequence ``since``: entries, next, counters, dropped.

        Each entry is [seq, time, pid, class, handle, kind, source].
        """
        self._ensure_attached()
        reply = self._call(Op.AUDIT, since=since, limit=limit)
        return {k: reply[k] for k in ("entries", "next", "counters", "dropped")}

    @property
    def messages_sent(self) -> int:
        """Requests this heap has sent since it (re)attached; for tests and bench/."""
        transport = self._transport
        return transport.messages if transport is not None else 0

    # -- slow path -------------------------------------------------------

    def _call(self, op: Op, **args: Any) -> dict[str, Any]:
        if op not in (Op.PING, Op.STATS, Op.AUDIT):
            args = {"client": self._client_id, "token": self._token, **args}
        return self._transport.call(op, **args)

    def _class_name(self, class_id: int) -> str:
        return ffi.string(self._classes_table[class_id].name).decode()

    @_in_use
    def _bind(self, cls: Class) -> int:
        self._ensure_attached()
        self._apply_guards()
        slot = lib.slitter_bind(self._client, cls.id)
        if slot < 0 and self._closed:  # closed by another thread since _ensure_attached
            raise self._closed_error()
        if slot == -1:
            raise errors.LimitExceeded(
                f"class '{cls.name}': all {lib.SLITTER_MAX_THREADS} thread slots of this client are in use",
                class_name=cls.name)
        if slot < 0:
            raise errors.SlitterError(f"class '{cls.name}' (id {cls.id}) is not usable on this heap",
                                      class_name=cls.name)
        return slot

    @_in_use
    def _allocate_slow(self, cls: Class) -> int:
        for _ in range(8):
            slot = self._bind(cls)
            handle = _fastpath.allocate(self._client, cls.id)
            if handle:
                return handle
            if self._transport is None:  # forked inside that call's hook: this child binds (attaches) again
                continue
            self._call(Op.REFILL, thread=slot, class_id=cls.id, spare=False)
            self._apply_guards()
            handle = _fastpath.allocate(self._client, cls.id)
            if handle:
                return handle
        raise errors.SlitterError(f"class '{cls.name}': refills brought no usable object", class_name=cls.name)

    def _allocate_many_slow(self, cls: Class, out: array, got: int) -> None:
        """Fill ``out[got:]``.  Whatever it raises carries the objects allocated so far in ``handles``:
        they are live, and only the caller knows them (OutOfMemory, or a close by another thread)."""
        try:
            self._allocate_many_refilling(cls, out, got)
        except errors.SlitterError as exc:
            if not hasattr(exc, "handles"):
                exc.handles = out[:_filled(out, got)]
            raise

    @_in_use
    def _allocate_many_refilling(self, cls: Class, out: array, got: int) -> None:
        buf = ffi.from_buffer("uint64_t[]", out)
        n = len(out)
        while got < n:
            slot = self._bind(cls)
            more = lib.slitter_allocate_many_key(cls._key, buf + got, n - got)
            if more == 0 and self._transport is not None:  # None: forked inside its hook; bind again
                self._call(Op.REFILL, thread=slot, class_id=cls.id, spare=False)  # raising: see _allocate_many_slow
                self._apply_guards()
            got += more

    @staticmethod
    def _u64_batch(handles: Iterable[int]) -> tuple[array, int | None]:
        """(handles as array('Q'), None), or (empty, the first int that is no u64)."""
        if isinstance(handles, array) and handles.typecode == "Q":
            return handles, None
        handles = list(handles)
        try:
            return array("Q", handles), None
        except (OverflowError, TypeError):
            for handle in handles:
                if isinstance(handle, int) and not 0 <= handle <= U64:
                    return array("Q"), handle
            raise

    def _check_batch(self, cls: Class, batch: array, buf: Any, bad: Any) -> int:
        """slitter_check_many_key over the batch, binding the thread first if it must."""
        result = lib.slitter_check_many_key(cls._key, buf, len(batch), bad)
        if result == _fastpath.NEED_SLOW:
            self._bind(cls)
            result = lib.slitter_check_many_key(cls._key, buf, len(batch), bad)
        return result

    @_in_use
    def _check_live(self, cls: Class, handles: Iterable[int], verb: str) -> array:
        """The handles as array('Q') if every one is a live object of ``cls``; else raise for the first bad one."""
        self._ensure_attached()  # closed: raise; a forked child: its own rack first
        batch, not_u64 = self._u64_batch(handles)
        if not_u64 is not None:
            raise self._release_error(cls, not_u64, lib.SLITTER_ERR_FOREIGN_ADDRESS, verb)
        if len(batch):
            # Objects of runs carved since the last look: their guard pages first.
            self._apply_guards()
            bad = ffi.new("uint32_t *")
            result = self._check_batch(cls, batch, ffi.from_buffer("uint64_t[]", batch), bad)
            if result < 0:
                raise self._release_error(cls, batch[bad[0]], -1 - result, verb)
        return batch

    @_in_use
    def _release_many(self, cls: Class, handles: Iterable[int], *, whole_tried: bool = False) -> None:
        """release_many's general path; ``whole_tried``: the batch call on all of it said NEED_SLOW."""
        batch, not_u64 = self._u64_batch(handles)
        if not_u64 is not None:  # none of the batch is released
            self._refused(cls, not_u64, lib.SLITTER_ERR_FOREIGN_ADDRESS, counted=False, released=0)
            return
        n = len(batch)
        if n == 0:
            return
        if not whole_tried:
            # A batch that fits the thread's magazines goes in one call, all or none
            # (slitter._batch takes an exact array('Q'), not a subclass).
            result = _fastpath.release_array(cls._key, batch if type(batch) is array else array("Q", batch))
            if result is not None and result != _fastpath.NEED_SLOW:
                self._batch_released(cls, batch, result)
                return
        # Unbound, or more than the magazines' room: check the whole batch, then release in chunks.
        buf = ffi.from_buffer("uint64_t[]", batch)
        bad = ffi.new("uint32_t *")
        result = self._check_batch(cls, batch, buf, bad)
        if result < 0:  # the check counts nothing: the refusal is counted here
            self._refused(cls, batch[bad[0]], -1 - result, counted=False, released=0)
            return
        done = 0
        while done < n:
            result = lib.slitter_release_many_key(cls._key, buf + done, n - done, bad)
            if result < 0:
                self._refused(cls, batch[done + bad[0]], -1 - result, released=done)
                return
            done += bad[0]
            try:
                if result == _fastpath.NEED_FLUSH:
                    self._flush_after_release(cls)
                elif result == _fastpath.NEED_SLOW and done < n:
                    self._flush(cls, self._bind(cls))
            except errors.SlitterError as exc:  # closed by another thread, say: say how many went back
                if getattr(exc, "released", None) is None:
                    exc.released = done
                raise

    def _batch_released(self, cls: Class, batch: array, result: int) -> None:
        """After a release_many call on the whole batch: flush if it asks, or report its refusal.

        Not _in_use itself (Class.release_many calls it after the native call): each step it takes is.
        """
        if result == _fastpath.NEED_FLUSH:
            self._flush_after_release(cls)
        elif result < 0:  # counted in C; none of the batch was released
            index, kind = _fastpath.batch_refusal(result)
            self._refused(cls, batch[index], kind, released=0)

    def _flush_after_release(self, cls: Class) -> None:
        """A release went through and its magazine asks for a flush.

        On a heap closed meanwhile, by another thread too, there is none to
        make: the release stands, and the detach takes the rack back.
        Raising "closed" would tell the caller it had not happened.
        """
        try:
            self._flush(cls, self._bind(cls))
        except errors.SlitterError:
            if not self._closed:
                raise

    def _release_slow(self, cls: Class, handle: int, result: int) -> None:
        if result == _fastpath.NEED_FLUSH:  # released: only the flush is left
            self._flush_after_release(cls)
        else:
            self._release_retrying(cls, handle, result)

    @_in_use
    def _release_retrying(self, cls: Class, handle: int, result: int) -> None:
        for _ in range(8):
            if result < 0:
                self._refused(cls, handle, -1 - result)
                return
            if result == _fastpath.OK:
                return
            if result == _fastpath.NEED_FLUSH:
                self._flush_after_release(cls)
                return
            slot = self._bind(cls)
            # NEED_SLOW: unbound until now, or the release magazine is full.
            result = _fastpath.release(self._client, cls.id, handle)
            if result == _fastpath.NEED_SLOW:
                self._flush(cls, slot)
                result = _fastpath.release(self._client, cls.id, handle)
        raise errors.SlitterError(f"class '{cls.name}': could not release handle {handle:#x}", class_name=cls.name)

    def _send_ahead(self, op: Op, thread: int, class_id: int, **flag: bool) -> None:
        """A request nobody waits for: refill the spare, or flush the outgoing magazine."""
        transport = self._transport
        if transport is not None and not self._closed:
            transport.send_nowait(op, client=self._client_id, token=self._token, thread=thread,
                                  class_id=class_id, **self._ahead_flags, **flag)

    @_in_use
    def _flush(self, cls: Class, slot: int) -> None:
        reply = self._call(Op.FLUSH, thread=slot, class_id=cls.id)
        refused = reply["refused"]
        for handle, kind in refused:
            log.warning("the daemon's audit refused handle %#x of class '%s': %s", handle, cls.name, kind)
        unlisted = reply.get("refused_total", len(refused)) - len(refused)  # a daemon before it sends no total
        if unlisted > 0:
            log.warning("the daemon's audit refused %d more handles of class '%s' (see its audit log)",
                        unlisted, cls.name)

    def _release_error(self, cls: Class, handle: object, kind: int,
                       verb: str = _fastpath.RELEASED) -> errors.ReleaseError:
        """The exception for ``handle`` refused as ``cls`` (``verb``: see release_error), naming the owner on a mismatch."""
        owner = None
        if kind == lib.SLITTER_ERR_CLASS_MISMATCH:
            _ptr, owner_id, _kind = _fastpath.locate(self._view, handle)
            owner = self._class_name(owner_id) if owner_id else None
        return _fastpath.release_error(kind, handle, cls.name, owner, verb)

    @_in_use
    def _refused(self, cls: Class, handle: object, kind: int, *, counted: bool = True,
                 released: int | None = None) -> None:
        """A release was refused: report it, then apply the error policy.

        ``counted`` is False when the native code did not count it (the
        handle did not fit its argument, or a batch check found it), so the
        refusal is counted here.  ``released``: for a batch, how many of its
        handles were released before the refused one (the error's attribute).
        """
        err = self._release_error(cls, handle, kind)
        if released is not None:
            err.released = released
        in_range = isinstance(handle, int) and 0 <= handle <= U64
        if not counted:
            self._bind(cls)
            lib.slitter_count_error(self._client, cls.id, kind)
        try:
            self._call(Op.REPORT, class_id=cls.id, handle=handle if in_range else U64, kind=kind)
        except errors.SlitterError as exc:
            log.warning("could not report %s to the audit log: %s", ERROR_KINDS[kind], exc)
        policy = self.policy or cls.policy
        if policy == "log":
            log.error("%s: %s (policy 'log': refused and carrying on)", type(err).__name__, err)
            return
        if policy == "abort":
            sys.stderr.write(f"slitter: {type(err).__name__}: {err}; aborting (policy 'abort')\n")
            sys.stderr.flush()
            os.abort()
        raise err

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"client {self._client_id}"
        return f"<slitter.Heap {self.address} {state}>"


#: Native client address -> heap, for the hooks; an entry goes with its heap.
_BY_CLIENT: weakref.WeakValueDictionary[int, Heap] = weakref.WeakValueDictionary()


def _ahead(client, op: Op, thread: int, class_id: int, **flag: bool) -> None:
    """Send the request a fast-path hook asks for, to the heap that owns ``client``."""
    try:
        heap = _BY_CLIENT.get(int(ffi.cast("uintptr_t", client)))
        if heap is not None:
            heap._send_ahead(op, thread, class_id, **flag)
    except Exception:  # a hook must never raise into C
        log.exception("%s ahead of need failed", op.value)


@ffi.def_extern()
def slitter_spare_taken(client, thread: int, class_id: int) -> None:
    """Called by the fast path when a thread took its prefetched magazine: prefetch the next."""
    _ahead(client, Op.REFILL, thread, class_id, spare=True)


@ffi.def_extern()
def slitter_outgoing_ready(client, thread: int, class_id: int) -> None:
    """Called by the fast path when a thread moved a full release magazine out: flush it."""
    _ahead(client, Op.FLUSH, thread, class_id, outgoing=True)


def _after_fork_in_child() -> None:
    for heap in list(_OPEN_HEAPS):
        heap._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def connect(address: str | None = None, *, name: str = "", timeout: float = 10.0, policy: str | None = None) -> Heap:
    """Attach to slitterd at ``address`` (default: $SLITTER_ADDRESS, else the default socket).

    ``timeout`` is how long a slow-path call (refill, flush, stats...) may
    wait for the daemon, across a restart of it, before DaemonUnavailable;
    the fast path never waits.

    ``policy`` ("raise", "log" or "abort") overrides every class's error
    policy for this client.

    Raises:
        DaemonUnavailable: nothing answered at the address.
    """
    return Heap(address, name=name, timeout=timeout, policy=policy)
