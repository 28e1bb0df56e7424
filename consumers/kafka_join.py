"""A fix for kafka-python 3.0.12's group join under short polls.

``BaseCoordinator.join_group_async`` runs JoinGroup and SyncGroup as one
background task and re-awaits it on the next ``poll`` when a poll's timeout
ends first. But it schedules a *new* join whenever the task is already done,
so a join that completes between two polls (while the worker handles a
batch, or sleeps) is thrown away, its assignment with it, and the member
joins again. When each join outlasts one poll, that repeats for as long as
the consumer lives: the worker never gets a partition (the request-priority
tests waited 60 s for an assignment; ``tests/test_kafka_join.py`` shows it in
a few polls).

The fix claims a join that succeeded while nobody awaited it, exactly as the
library does when it awaits the task itself, then lets the library go on. A
failed task is left to the library, which joins again, as it does after any
join error. It applies only to a kafka-python whose source still has the
condition, so an upstream fix retires it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from kafka.coordinator.base import BaseCoordinator
from kafka.structs import MemberState

log = logging.getLogger(__name__)

#: the condition in ``join_group_async`` that discards a finished join
FAULTY = "self._join_task is None or self._join_task.is_done"


def needs_fix() -> bool:
    """Whether the installed kafka-python still discards finished joins."""
    original = getattr(BaseCoordinator.join_group_async, "__wrapped__",
                       BaseCoordinator.join_group_async)
    return FAULTY in inspect.getsource(original)


async def _claim_finished_join(self: Any) -> None:
    """The library's own success path, for a join task that finished unawaited."""
    task = self._join_task
    if task is None or not task.is_done or not task.succeeded():
        return
    self._join_task = None
    with self._lock:
        self.rejoining = False
        self.rejoin_needed = False
        self.state = MemberState.STABLE
        self._enable_heartbeat()
    generation = self._generation
    log.debug("group %s: claimed a join that finished between polls", self.group_id)
    await self._on_join_complete_async(generation.generation_id, generation.member_id,
                                       generation.protocol, task.value)


def apply() -> bool:
    """Patch ``BaseCoordinator.join_group_async`` once; True if it is (now) patched."""
    current = BaseCoordinator.join_group_async
    if hasattr(current, "__wrapped__"):
        return True
    if not needs_fix():
        return False

    async def join_group_async(self: Any, timeout_ms: Any = None) -> bool:
        await _claim_finished_join(self)
        return await current(self, timeout_ms)

    join_group_async.__wrapped__ = current  # type: ignore[attr-defined]
    join_group_async.__doc__ = current.__doc__
    BaseCoordinator.join_group_async = join_group_async  # type: ignore[method-assign]
    return True
