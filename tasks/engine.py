"""The worker's engine: one thread owns the device, the base models and every adapter (DESIGN "Worker engine").

Celery's pool threads decode a message, hand the request here (`Engine.run`) and wait. Each tick the engine takes
the ready head request of every adapter (next in seq_id order), groups them by kind and base model, and makes one
backend call per group: many adapters' forward/backward in one pass, ready optim_steps together, many sample calls
in one generation loop. A lone request runs at once; nothing waits for a batch to fill.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserError

log = logging.getLogger("tinkerbell.engine")

FWD_BWD, OPTIM, CALL, SAMPLE = "forward_backward", "optim_step", "call", "sample"
NOT_RUN = ("refused-", "expired-")  # request ids the registry records for seq_ids that run nothing (api/service.py)


@dataclass
class Work:
    """One request for the engine.

    kind: FWD_BWD (payload: FwdBwdRequest), OPTIM (payload: AdamSpec), SAMPLE (payload: SampleRequest) or CALL
    (payload: a function run alone on the engine thread). model_id/seq_id: set for a request that touches an
    adapter; such requests run in seq_id order, one at a time per adapter. before(): checks on the engine thread
    just before the request runs (raise to fail it); after(result) -> value: bookkeeping after it ran.
    """

    kind: str
    payload: Any
    model_id: str | None = None
    seq_id: int | None = None
    tokens: int = 0
    before: Callable[[], None] | None = None
    after: Callable[[Any], Any] | None = None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    # A time limit (seconds from arrival; None: none) and the setting that sets it. A request still waiting past it
    # fails without running; one whose call returns past it (or that its pool thread gave up on) is undone by
    # undo() and fails. A request without undo keeps the result of a call that ran long.
    time_limit_s: float | None = None
    limit_setting: str = ""
    undo: Callable[[], str] | None = None  # on the engine thread; returns what it restored, for the message
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False  # its pool thread stopped waiting while it ran
    finishing: bool = False  # the engine is answering it: too late to abandon

    def overdue(self) -> float | None:
        """Seconds since it arrived, when that is past its time limit; else None."""
        elapsed = time.monotonic() - self.arrived
        return elapsed if self.time_limit_s and elapsed > self.time_limit_s else None

    def limit_error(self, elapsed: float, what: str) -> UserError:
        label = self.kind if self.kind != CALL else getattr(self.payload, "__name__", CALL)
        return UserError(
            f"{label}: {what} after {elapsed:.1f} s, past the worker's time limit ({self.limit_setting}="
            f"{self.time_limit_s:g}); the worker goes on with the adapter's later requests"
        )


GATHER_FRACTION = 0.25  # a gather window is at most this fraction of the last pass's duration
GIVE_UP_GRACE_S = 1.0  # a pool thread waits this much past a request's limit for the engine to answer it


@dataclass
class _Lane:
    """One adapter's requests held here, by seq_id, and the last seq_id this worker finished for it."""

    pending: dict[int, Work] = field(default_factory=dict)
    unordered: deque[Work] = field(default_factory=deque)  # adapter calls without a seq_id (create, restore)
    last: int | None = None  # None: not yet read from the registry
    waiting_since: float | None = None  # head held behind a missing seq_id since


class Engine:
    """Schedules requests onto the backends from one thread.

    backends: a callable returning (training backend, sampling backend) lazily, so a sampling-only worker never
    builds a training backend. applied(model_id) -> last applied seq_id (the registry's). missing(model_id, after,
    before) -> seq_ids in that open range admitted for real requests whose results are not stored: a head request
    runs only once none is left (they are in flight on this worker, or were lost).
    """

    def __init__(
        self,
        training: Callable[[], Any],
        sampling: Callable[[], Any],
        applied: Callable[[str], int],
        missing: Callable[[str, int, int], list[int]],
        token_budget: int = 8192,
        gap_timeout_s: float = 120.0,
        gather_s: float = 0.5,
    ) -> None:
        self._training, self._sampling = training, sampling
        self._applied, self._missing = applied, missing
        self.token_budget = token_budget
        self.gap_timeout_s = gap_timeout_s
        self.gather_s = gather_s
        # The gather window (_gathering): the adapters of the last two forward_backward passes, and how long the
        # last pass took; a ready request waits a moment for those adapters' next requests when they are missing.
        self._recent: tuple[set[str], set[str]] = (set(), set())
        self._last_pass_s = 0.0
        self._wake_at: float | None = None
        self._inbox: deque[Work] = deque()
        self._cond = threading.Condition()
        self._lanes: dict[str, _Lane] = {}
        self._samples: deque[Work] = deque()
        self._calls: deque[Work] = deque()
        self._turn = itertools.count()  # round-robin start for fairness across adapters
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.stats: dict[str, float] = {
            "ticks": 0,
            "passes": 0,
            "multi_adapter_passes": 0,
            "max_adapters_per_pass": 0,
            "adapters_in_passes": 0,
            "gather_waits": 0,
            "sample_batches": 0,
            "max_requests_per_sample_batch": 0,
            "optim_batches": 0,
        }
        self.last_pass: dict[str, Any] = {}
        self.base_of: dict[str, str] = {}  # model_id -> base model, for grouping a pass
        self.busy: dict[str, Any] | None = None  # what the engine runs now: {"task": …, "started": epoch seconds}
        # A sample batch in progress: its requests and the backend's stepping generator, advanced a slice per tick
        # so training heads run between decode steps instead of waiting for the whole batch.
        self._sampling_run: tuple[list[Work], Any, float] | None = None
        self.sample_slice_s = 0.2

    # ---- called from Celery's pool threads ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def submit(self, work: Work) -> Future:
        self.start()
        with self._cond:
            self._inbox.append(work)
            self._cond.notify()
        return work.future

    def run(self, work: Work) -> Any:
        """Submit and wait: the task body's one call. The request's own exception is raised here.

        With a time limit the wait is bounded even when the engine thread is stuck in a call: past the limit the
        request is withdrawn if it has not started, or abandoned if it is running (the engine undoes it when that
        call returns), and it fails here."""
        future = self.submit(work)
        if not work.time_limit_s:
            return future.result()
        try:
            return future.result(timeout=work.time_limit_s + GIVE_UP_GRACE_S)
        except TimeoutError:
            pass
        elapsed = time.monotonic() - work.arrived
        if future.cancel():
            raise work.limit_error(elapsed, "still waiting for the worker's engine, not started") from None
        with work.lock:
            work.abandoned = not work.finishing
        if work.abandoned:
            raise work.limit_error(
                elapsed,
                "still running in the engine"
                + ("; its effect is undone when that call returns" if work.undo else ", and cannot be interrupted"),
            ) from None
        return future.result()

    def status(self) -> dict[str, Any]:
        """What the heartbeat and the status page show: requests held, by adapter, and the pass counters."""
        held = sum(len(lane.pending) + len(lane.unordered) for lane in list(self._lanes.values()))
        return {
            "held": held,
            "samples_held": len(self._samples),
            "stats": dict(self.stats),
            "last_pass": dict(self.last_pass),
            "busy": self.busy,
        }

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._stopped and not self._has_work():
                    self._cond.wait()
                if self._stopped:
                    return
                arrived = list(self._inbox)
                self._inbox.clear()
            for work in arrived:
                self._file(work)
            try:
                ran = self._tick()
            except BaseException:  # the engine must not die: a bug fails what this tick held, not the worker
                log.exception("engine tick failed")
                ran = True
            if not ran:  # held behind a missing seq_id or in a gather window: look again soon, or on an arrival
                wait = 0.2 if self._wake_at is None else min(0.2, max(self._wake_at - time.monotonic(), 0.0))
                with self._cond:
                    if not self._inbox:
                        self._cond.wait(wait)

    def _has_work(self) -> bool:
        return bool(
            self._samples
            or self._calls
            or self._sampling_run
            or any(lane.pending or lane.unordered for lane in self._lanes.values())
        )

    def _file(self, work: Work) -> None:
        if work.kind == SAMPLE:
            self._samples.append(work)
        elif work.model_id is None:
            self._calls.append(work)
        else:
            lane = self._lanes.setdefault(work.model_id, _Lane())
            if work.seq_id is None:
                lane.unordered.append(work)
            elif work.seq_id in lane.pending:  # the same request delivered twice at once: run it once
                lane.pending[work.seq_id].future.add_done_callback(lambda done, w=work: _copy_outcome(done, w.future))
            else:
                lane.pending[work.seq_id] = work

    def _head(self, model_id: str, lane: _Lane) -> Work | None:
        """The adapter's next request if it may run now: unordered calls first, then the lowest seq_id once every
        seq_id before it has run here (or runs nothing, or finished elsewhere)."""
        if lane.unordered:
            return lane.unordered[0]
        if not lane.pending:
            return None
        seq = min(lane.pending)
        if lane.last is None:
            lane.last = self._applied(model_id)
        if seq <= lane.last + 1:
            return lane.pending[seq]
        now = time.monotonic()
        if self._missing(model_id, lane.last, seq):
            lane.waiting_since = lane.waiting_since or now
            if now - lane.waiting_since < self.gap_timeout_s:
                return None
            log.warning(
                "%s: seq_id %d waited %.0f s for earlier requests that never came; running it",
                model_id,
                seq,
                now - lane.waiting_since,
            )
        lane.waiting_since = None
        return lane.pending[seq]

    def _pop(self, work: Work) -> None:
        lane = self._lanes[work.model_id]  # type: ignore[index]
        if work.seq_id is None:
            lane.unordered.popleft()
        else:
            del lane.pending[work.seq_id]
            lane.last = max(lane.last or 0, work.seq_id)

    def held(self, model_id: str) -> int:
        """Requests of the adapter held here now (engine thread)."""
        lane = self._lanes.get(model_id)
        return 0 if lane is None else len(lane.pending) + len(lane.unordered)

    def forget(self, model_id: str) -> None:
        """The adapter left this worker (removed, or moved): drop its lane once nothing of it is held."""
        lane = self._lanes.get(model_id)
        if lane is not None and not lane.pending and not lane.unordered:
            del self._lanes[model_id]

    def _tick(self) -> bool:
        """One round: every adapter's ready head, batched by kind; then sampling. False when nothing could run."""
        self._wake_at = None  # set again by _gathering while a window is open
        heads = [w for model_id, lane in list(self._lanes.items()) if (w := self._head(model_id, lane)) is not None]
        calls = list(self._calls)
        self._calls.clear()
        samples = [] if self._sampling_run else list(self._samples)  # new ones wait for the batch in progress
        if samples:
            self._samples.clear()
        if not heads and not calls and not samples and not self._sampling_run:
            return False
        self.stats["ticks"] += 1
        start = next(self._turn) % max(len(heads), 1)
        heads = heads[start:] + heads[:start]  # who goes first (and so gets into a full pass) rotates
        fwd = [w for w in heads if w.kind == FWD_BWD]
        if self._gathering(fwd):
            fwd = []  # their partners' requests are on the way: this tick runs the rest, the pass comes next
            if not (calls or samples or self._sampling_run or any(w.kind != FWD_BWD for w in heads)):
                return False
        budget, taken = self.token_budget, []
        for work in fwd:  # at least one request per pass; others until the token budget is spent
            if taken and work.tokens > budget:
                continue
            taken.append(work)
            budget -= work.tokens
        for work in taken:
            self._pop(work)
        self._forward_backward(taken)
        optims = [w for w in heads if w.kind == OPTIM]
        for work in optims:
            self._pop(work)
        self._optim_steps(optims)
        for work in [w for w in heads if w.kind == CALL] + calls:
            if work.model_id is not None:
                self._pop(work)
            self._call(work)
        self._sample(samples)
        return True

    def _gathering(self, fwd: list[Work]) -> bool:
        """Whether the ready forward_backward heads wait a moment for adapters that shared the last passes with
        them and have no request here yet (concurrent clients' requests arrive spread over some 100 ms; without
        the wait the first one to arrive runs alone and the rest wait a whole pass for the next one).

        The wait ends when those adapters' requests are all here, when the token budget is full, or at most
        gather_s (and a quarter of the last pass's duration) after the first ready request arrived. An adapter
        alone, or with no partner in the last two passes, never waits."""
        if not fwd or self.gather_s <= 0:
            return False
        ready = {w.model_id for w in fwd}
        bases = {self.base_of.get(m or "", "") for m in ready}
        partners = {m for m in self._recent[0] | self._recent[1] if self.base_of.get(m, "") in bases} - ready
        partners = {
            m for m in partners if (lane := self._lanes.get(m)) is not None and not (lane.pending or lane.unordered)
        }
        if not partners or sum(w.tokens for w in fwd) >= self.token_budget:
            return False
        deadline = min(w.arrived for w in fwd) + min(self.gather_s, GATHER_FRACTION * self._last_pass_s)
        if time.monotonic() >= deadline:
            return False
        self._wake_at = deadline
        self.stats["gather_waits"] += 1
        return True

    # ---- running a group -----------------------------------------------------------------------------------
    def _admit(self, works: list[Work]) -> list[Work]:
        """Run each request's before() check; those that fail are answered now and left out."""
        ok = []
        for work in works:
            if not work.future.set_running_or_notify_cancel():
                continue  # its pool thread withdrew it (time limit) and has answered
            try:
                if (elapsed := work.overdue()) is not None:
                    raise work.limit_error(elapsed, "not started (the adapter is unchanged)")
                if work.before is not None:
                    work.before()
            except BaseException as exc:  # noqa: BLE001 - the request's own failure, answered to its caller
                work.future.set_exception(exc)
                continue
            ok.append(work)
        return ok

    def _finish(self, work: Work, result: Any) -> None:
        with work.lock:
            work.finishing = True
            abandoned = work.abandoned
        elapsed = work.overdue()
        if work.undo is not None and not isinstance(result, BaseException) and (abandoned or elapsed is not None):
            try:
                restored = work.undo()
            except BaseException as exc:
                log.exception("could not undo %s of %s", work.kind, work.model_id)
                restored = f"undoing it failed ({exc!r})"
            log.warning("%s of %s ran past its time limit: undone (%s)", work.kind, work.model_id, restored)
            result = work.limit_error(elapsed or time.monotonic() - work.arrived, f"finished too late: {restored}")
        if isinstance(result, BaseException):
            work.future.set_exception(result)
            return
        try:
            work.future.set_result(work.after(result) if work.after is not None else result)
        except BaseException as exc:  # noqa: BLE001
            work.future.set_exception(exc)

    def _group_call(self, works: list[Work], call: Callable[[list[Any]], list[Any]]) -> None:
        kind = getattr(works[0].payload, "__name__", CALL) if works[0].kind == CALL else works[0].kind
        label = kind if len(works) == 1 else f"{kind} x{len(works)}"
        self.busy = {"task": label, "started": time.time()}
        try:
            results = call([w.payload for w in works])
        except BaseException as exc:
            log.exception("backend call failed for %d request(s)", len(works))
            results = [exc] * len(works)
        finally:
            self.busy = None
        for work, result in zip(works, results):
            self._finish(work, result)

    def _forward_backward(self, works: list[Work]) -> None:
        works = self._admit(works)
        groups: dict[str, list[Work]] = {}
        for work in works:
            groups.setdefault(self.base_of.get(work.model_id or "", ""), []).append(work)
        if works:
            self._recent = (self._recent[1], {w.model_id for w in works if w.model_id is not None})
        for group in groups.values():
            backend = self._training()
            started = time.monotonic()
            self._group_call(group, backend.forward_backward)
            self._last_pass_s = time.monotonic() - started
            adapters = len({w.model_id for w in group})
            self.stats["passes"] += 1
            self.stats["multi_adapter_passes"] += adapters > 1
            self.stats["adapters_in_passes"] += adapters  # / passes: the mean adapters per pass
            self.stats["max_adapters_per_pass"] = max(self.stats["max_adapters_per_pass"], adapters)
            self.last_pass = {
                "adapters": adapters,
                "requests": len(group),
                **(getattr(backend, "last_pass", None) or {}),
            }
            if adapters > 1:
                log.debug("one pass over %d adapters: %s", adapters, self.last_pass)

    def _optim_steps(self, works: list[Work]) -> None:
        works = self._admit(works)
        if works:
            self.stats["optim_batches"] += 1
            self._group_call(
                works, lambda specs: self._training().optim_steps([(w.model_id, spec) for w, spec in zip(works, specs)])
            )

    def _call(self, work: Work) -> None:
        if self._admit([work]):
            self._group_call([work], lambda _: [work.payload()])

    def _sample(self, works: list[Work]) -> None:
        """Start a sample batch of the held requests (if none is in progress), then advance the one in progress by
        about sample_slice_s of decode steps; a backend without sample_steps runs its batch in one go."""
        works = self._admit(works)
        if works:
            self.stats["sample_batches"] += 1
            self.stats["max_requests_per_sample_batch"] = max(self.stats["max_requests_per_sample_batch"], len(works))
            backend = self._sampling()
            if not hasattr(backend, "sample_steps"):
                self._group_call(works, backend.sample_batch)
                return
            self._sampling_run = (works, backend.sample_steps([w.payload for w in works]), time.time())
        if self._sampling_run is None:
            return
        works, steps, started = self._sampling_run
        self.busy = {"task": SAMPLE if len(works) == 1 else f"{SAMPLE} x{len(works)}", "started": started}
        until = time.monotonic() + self.sample_slice_s
        results: list[Any] | None = None
        try:
            while results is None and time.monotonic() < until:
                try:
                    next(steps)
                except StopIteration as done:
                    results = done.value
        except BaseException as exc:
            log.exception("sample batch failed for %d request(s)", len(works))
            results = [exc] * len(works)
        if results is not None:
            self._sampling_run = self.busy = None
            for work, result in zip(works, results):
                self._finish(work, result)


def _copy_outcome(done: Future, target: Future) -> None:
    if done.cancelled():
        target.cancel()
    elif done.exception() is not None:
        target.set_exception(done.exception())
    else:
        target.set_result(done.result())
