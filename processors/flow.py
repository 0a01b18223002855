"""faust's flow control without the discard that loses records when a worker finishes recovery.

faust 0.15 delivers fetched records into per-stream queues that ``app.flow_control`` (mode's
``FlowControlEvent``) empties on every ``resume()``, whether or not the flow was suspended. Table
recovery resumes the flow to read the changelogs, and at the end (``Recovery._resume_streams``) resumes
the stream partitions, seeks them to their committed offsets and *then* calls ``resume()`` again. The
fetcher runs during that seek: records it delivers in the meantime are marked read, and the second
``resume()`` throws them away. They are never fetched again, so they are never processed, and faust's
commit stops at the first of them (or, for a one-record hole, commits over it). A partition with no
committed offset yet (a new partition after ``audience-relay partitions apply``, or a new topic) is
not even sought back, so everything it delivered in that window is lost: the 4 → 12 partitions test
lost the follow-up events of all eight new partitions this way, and joining workers lost the records
just above the committed offsets.

``KeepingFlowControl.resume()`` empties the queues only when the flow really was suspended. That is
the case the clearing exists for: a rebalance suspends the flow (and empties the queues) and
records delivered before it belong to the old assignment. Records of an older generation that reach a
stream anyway are skipped by faust's stream itself (it compares each message's generation with the
consumer's), so nothing from before a rebalance is processed because of this change; what it keeps
are records fetched in the current generation, which are processed at least once.
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
