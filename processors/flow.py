"""faust's flow control without the discard that loses changelog records of standby copies.

faust 0.15 delivers fetched changelog records into a queue (``TableManager.changelog_queue``) that
``app.flow_control`` (mode's ``FlowControlEvent``) empties on every ``resume()``, whether or not the
flow was suspended. Table recovery resumes the flow to read the active partitions, resumes it again
to start the standby partitions, and calls ``resume()`` once more when it completes. Records of a
standby partition fetched in between are marked read and then thrown away: they are never fetched
again, and the standby copy applies the records after them — a hole that stays until the copy is
promoted, when the hole becomes lost state. (Before the stages left faust's stream consumer, the
same discard lost stream records at the end of every recovery.)

``KeepingFlowControl.resume()`` empties the queues only when the flow really was suspended. That is
the case the clearing exists for: a rebalance suspends the flow (and empties the queues), and records
delivered before it belong to the old assignment; a rebalance also forgets the read offsets of every
partition, so those records are fetched again after it.

This is one of the two places that touch faust or mode beyond their public API (the other is
``processors/state.py``); tests/test_faust_contract.py fails when the behaviour relied on changes.
"""

from __future__ import annotations

import faust
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent


class KeepingFlowControl(FlowControlEvent):
    """A ``FlowControlEvent`` whose ``resume()`` keeps the queues when the flow was not suspended."""

    def resume(self) -> None:
        if self.is_active():
            return  # already flowing: the queues hold current records, keep them
        super().resume()


class App(faust.App):
    """faust's app with ``KeepingFlowControl`` (see the module docstring)."""

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeepingFlowControl(loop=self.loop)
