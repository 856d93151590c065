"""Fair admission between API keys, in front of the engine.

The engine schedules first come, first served; one key that sends 500 requests would make every other key
wait behind them. So requests enter the engine through this gate: at most `capacity` sequences are inside
the engine at once, and each freed place goes to the key with the fewest sequences inside (ties: the one
served least recently, i.e. round-robin). Each key may have at most `max_waiting` requests queued here (429 beyond, with
Retry-After), and optionally at most `max_running_per_key` sequences inside. Without API keys every request
shares one key, and the gate is a bounded FIFO queue.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.async_engine import QueueFullError


@dataclass
class _Waiter:
    weight: int
    future: asyncio.Future[None]


@dataclass
class _KeyState:
    running: int = 0  # sequences of this key inside the engine
    last_grant: int = -1  # when it last got a place (round-robin between keys with as many inside)
    waiting: deque[_Waiter] = field(default_factory=deque)


class Ticket:
    """A place inside the engine for `weight` sequences; `release()` (idempotent) gives it back."""

    def __init__(self, gate: FairGate, key: object, weight: int):
        self._gate, self._key, self._weight = gate, key, weight
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release(self._key, self._weight)


class FairGate:
    def __init__(self, capacity: int, max_waiting: int, max_running_per_key: int | None = None):
        if capacity < 1 or max_waiting < 1:
            raise ValueError("capacity and max_waiting must be >= 1")
        if max_running_per_key is not None and max_running_per_key < 1:
            raise ValueError(f"--max-concurrent-per-key must be >= 1, got {max_running_per_key}")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.max_running_per_key = max_running_per_key
        self._keys: dict[object, _KeyState] = {}
        self._running = 0
        self._order = itertools.count()

    @property
    def num_waiting(self) -> int:
        return sum(len(s.waiting) for s in self._keys.values())

    @property
    def num_running(self) -> int:
        return self._running

    def running_of(self, key: object) -> int:
        state = self._keys.get(key)
        return state.running if state else 0

    async def acquire(self, key: object, weight: int = 1) -> Ticket:
        """Wait for a place for `weight` sequences of `key`. Raises QueueFullError at once when the key
        already has `max_waiting` requests queued. Cancelling the wait leaves the queue cleanly."""
        weight = max(1, min(weight, self.capacity))
        state = self._keys.setdefault(key, _KeyState())
        if not state.waiting and self._fits(state, weight):
            self._grant(state, weight)
            return Ticket(self, key, weight)
        if len(state.waiting) >= self.max_waiting:
            self._forget(key)
            raise QueueFullError(
                f"the server is busy: {len(state.waiting)} request(s) of this client are already waiting "
                "(--max-waiting); retry later"
            )
        waiter = _Waiter(weight, asyncio.get_running_loop().create_future())
        state.waiting.append(waiter)
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(key, weight)  # granted just as the wait was cancelled
            else:
                if waiter in state.waiting:
                    state.waiting.remove(waiter)
                self._forget(key)
                self._dispatch()
            raise
        return Ticket(self, key, weight)

    def _fits(self, state: _KeyState, weight: int) -> bool:
        per_key = self.max_running_per_key
        if per_key is not None and state.running and state.running + weight > per_key:
            return False
        return self._running == 0 or self._running + weight <= self.capacity

    def _grant(self, state: _KeyState, weight: int) -> None:
        state.last_grant = next(self._order)
        state.running += weight
        self._running += weight

    def _release(self, key: object, weight: int) -> None:
        state = self._keys.get(key)
        if state is not None:
            state.running -= weight
            self._running -= weight
            self._forget(key)
        self._dispatch()

    def _forget(self, key: object) -> None:
        state = self._keys.get(key)
        if state is not None and not state.running and not state.waiting:
            del self._keys[key]

    def _dispatch(self) -> None:
        """Hand free places to waiting keys, fewest sequences inside first, then the least recently served."""
        while True:
            candidates = [
                (state.running, state.last_grant, key)
                for key, state in self._keys.items()
                if state.waiting and self._fits(state, state.waiting[0].weight)
            ]
            if not candidates:
                return
            _, _, key = min(candidates, key=lambda c: (c[0], c[1]))
            state = self._keys[key]
            waiter = state.waiting.popleft()
            if waiter.future.done():  # cancelled: its task removes nothing more
                self._forget(key)
                continue
            self._grant(state, waiter.weight)
            waiter.future.set_result(None)
