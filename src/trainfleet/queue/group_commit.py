"""Group commit: the writes of the requests served in one turn of the event loop share one
COMMIT, so one fsync makes a whole batch of claims and completions durable.

A receiver on SQLite writes on its event loop, one transaction and one fsync per claim or
completion; the fsync and the writing of the same index pages again and again were a third of
a worker cycle (bench/README.md). Inside `grouped()` a queue's write joins the group's open
transaction instead (a savepoint, so a failing call still changes nothing), and the group
commits once, at the first turn of the loop in which no write joined it (at most MAX_TURNS).
`grouped()` returns only once that COMMIT is done, so no answer is sent before what it
reports is durable; if the COMMIT fails, every member gets the error.

Only the hot worker calls (receiver/hot_routes.py) run grouped. Any other write first commits
an open group, then runs on its own as before. Reads see a group's writes before they are
durable, so a grouped request that read them waits for that group too, and any other reader
commits the group first (SqliteQueue._read).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(eq=False)
class Group:
    """One open transaction shared by the writes of one turn of the loop."""

    loop: asyncio.AbstractEventLoop
    thread: int  #: the loop's thread
    done: asyncio.Future[None]
    writes: int = 0

    @classmethod
    def open(cls, joining: Member) -> Group:
        return cls(joining.loop, joining.thread, joining.loop.create_future())

    def settle(self, error: BaseException | None) -> None:
        """Tell the members their COMMIT is done (or failed), from any thread."""
        if threading.get_ident() == self.thread:
            _resolve(self.done, error)
            return
        try:
            self.loop.call_soon_threadsafe(_resolve, self.done, error)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass


@dataclass(eq=False)
class Member:
    """A request running grouped: the groups its writes joined."""

    loop: asyncio.AbstractEventLoop
    thread: int
    groups: list[Group] = field(default_factory=list)

    def wait_for(self, group: Group) -> None:
        """Answer only once `group` is committed: this request wrote to it or read from it."""
        if not self.groups or self.groups[-1] is not group:
            self.groups.append(group)


#: A group waits at most this many turns of the loop for more writes before it commits.
MAX_TURNS = 4

_MEMBER: ContextVar[Member | None] = ContextVar("trainfleet_group_member", default=None)


def member() -> Member | None:
    """The grouped request this call belongs to, if it runs on that request's loop thread
    (a thread the request handed work to inherits the context, not the group)."""
    found = _MEMBER.get()
    if found is None or found.thread != threading.get_ident():
        return None
    return found


@asynccontextmanager
async def grouped() -> AsyncIterator[None]:
    """Run a request's queue writes in the loop's current group; on the way out, wait until
    the groups they joined are committed, error or not."""
    joined = Member(asyncio.get_running_loop(), threading.get_ident())
    token = _MEMBER.set(joined)
    try:
        yield
    finally:
        _MEMBER.reset(token)
        for group in joined.groups:
            # shield: a cancelled request must not cancel the COMMIT's future for the others
            await asyncio.shield(group.done)


def _resolve(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
        done.exception()  # retrieved: no "never retrieved" warning when no member waits
