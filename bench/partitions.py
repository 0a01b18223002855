"""How long ``audience-relay partitions apply`` takes for a million memberships.

    python -m bench.partitions [--identifiers 250000] [--audiences 4] [--from-partitions 4] [--to 12]

The membership state is pre-loaded straight into the compacted membership topic (the table's
changelog), with values computed by the processors' own pure functions (``processors.membership.fold``)
and placed where a worker would have put them — building it through a worker would take far longer
than the move being measured. Then ``plan`` and ``apply`` run against it and the figures are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import resource
import sys
import time
import uuid
from typing import Any

import orjson

from audience_relay import kafka
from audience_relay.kafkautil import topic_size
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from bench.common import arguments, broker
from processors import partitions as parts
from processors.membership import fold


def events_for(n: int, audiences: int) -> list[dict[str, Any]]:
    """One identifier entering ``audiences`` audiences (SegmentEvent dicts as the worker reads them)."""
    ident = f"user{n}@example.com"
    return [
        {
            "schema_version": 2,
            "event_id": f"e{n}-{a}",
            "identifier": ident,
            "match_field": "email",
            "audience_id": f"aud-{a}",
            "audience_slug": f"audience_{a}",
            "event": "enter",
            "event_time": f"2026-11-01T10:00:{a:02d}Z",
            "event_time_source": "segment_event",
            "lytics_user_id": str(n),
            "identifiers": {},
            "source": "default",
            "request_id": f"bench-{n}",
            "received_at": "2026-11-01T10:00:00Z",
        }
        for a in range(audiences)
    ]


async def preload(settings: Settings, identifiers: int, audiences: int) -> int:
    """Membership records for every identifier; returns the memberships written."""
    names = TopicNames.from_settings(settings)
    producer = kafka.producer(
        settings,
        linger_ms=20,
        max_batch_size=1 << 20,
        max_request_size=16 << 20,
        # Preloading test data: leader-only acks are enough and faster.
        enable_idempotence=False,
        acks=1,
    )
    await producer.start()
    memberships = 0
    try:
        pending = []
        for n in range(identifiers):
            states, _ = fold(events_for(n, audiences))
            partition = partition_for(f"user{n}@example.com", settings.partitions)
            for key, state in states.items():
                pending.append(
                    await producer.send(names.membership, orjson.dumps(state), key=key, partition=partition)
                )
                memberships += 1
            if len(pending) >= 50_000:
                await asyncio.gather(*pending)
                pending = []
            if n % 50_000 == 0 and n:
                print(f"  preloaded {n:,} identifiers", file=sys.stderr)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return memberships


async def main(args: argparse.Namespace) -> None:
    with broker() as (bootstrap, _):
        settings = Settings(
            kafka_bootstrap_servers=bootstrap,
            topic_prefix=f"benchparts{uuid.uuid4().hex[:8]}",
            partitions=args.from_partitions,
        )
        await create_topics(settings)
        t0 = time.monotonic()
        memberships = await preload(settings, args.identifiers, args.audiences)
        preload_s = time.monotonic() - t0
        membership = TopicNames.from_settings(settings).membership
        records = await topic_size(bootstrap, membership)

        out = io.StringIO()
        t0 = time.monotonic()
        assert await parts.plan(settings, args.to, out, progress=not args.quiet) == 0, out.getvalue()
        plan_s = time.monotonic() - t0
        out = io.StringIO()
        t0 = time.monotonic()
        code = await parts.apply(settings, args.to, out, progress=not args.quiet)
        apply_s = time.monotonic() - t0
        assert code == 0, out.getvalue()
        print(out.getvalue())
        after = await topic_size(bootstrap, membership)
        written = after - records
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"state pre-loaded directly (values from processors.membership.fold, not through a worker): "
            f"{args.identifiers:,} identifiers x {args.audiences} audiences = {memberships:,} memberships, "
            f"{records:,} records in the membership topic, in {preload_s:.1f} s"
        )
        print(f"partitions plan --to {args.to}: {plan_s:.1f} s (reads the state topic, counts keys to move)")
        print(
            f"partitions apply {args.from_partitions} -> {args.to}: {apply_s:.1f} s; "
            f"{written:,} records written (values + tombstones), "
            f"{records / apply_s:,.0f} records read/s, {memberships / apply_s:,.0f} memberships/s; "
            f"peak RSS of this process {rss_mb:,.0f} MiB"
        )


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--identifiers", type=int, default=250_000)
    parser.add_argument("--audiences", type=int, default=4)
    parser.add_argument("--from-partitions", type=int, default=4)
    parser.add_argument("--to", type=int, default=12)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    asyncio.run(main(parser.parse_args()))
