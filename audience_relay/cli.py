"""``audience-relay``: one command, a subcommand per component.

Settings come from the environment (see README); each subcommand loads them once and passes them on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from audience_relay import logs
from audience_relay.settings import Settings
from devtools.localkafka import LocalKafka, LocalKafkaError, fetch_jars

log = logging.getLogger("audience_relay")


def _settings() -> Settings:
    try:
        return Settings()
    except SettingsError as exc:
        raise SystemExit(f"invalid settings: {exc}: {exc.__cause__}") from None
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise SystemExit("invalid settings:\n" + "\n".join(lines)) from None


def _local_kafka(settings: Settings) -> LocalKafka:
    return LocalKafka(settings.local_dir, port=settings.local_kafka_port)


def cmd_ingress(args: argparse.Namespace, settings: Settings) -> int:
    from ingress.app import run

    run(settings, insecure=args.insecure)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from processors.worker import run_worker

    run_worker(settings)
    return 0


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.run import run_sink

    run_sink(settings, args.name)
    return 0


def cmd_sink_resync(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.resync import resync

    report = asyncio.run(
        resync(settings, args.name, args.audience, restart=args.restart, progress=not args.quiet)
    )
    print(
        f"resync to {args.name}{' (resumed)' if report.resumed else ''}: {report.members} members, "
        f"{report.delivered} delivered, {report.already_sent} sent by the interrupted run before, "
        f"{report.filtered} filtered, {report.dead_lettered + report.unknown_identifier} dead-lettered "
        f"({report.unknown_identifier} without the identifier to send)"
    )
    return 0


def cmd_dead_letter_replay(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.replay import replay_dead_letters

    report = asyncio.run(replay_dead_letters(settings, args.sink, progress=not args.quiet))
    print(
        f"replayed to {args.sink}: {report.delivered} delivered, {report.refused} still refused "
        f"(dead-lettered again, replayable), {report.superseded} superseded (skipped)"
    )
    return 0 if report.refused == 0 else 4


def cmd_schemas_export(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.export import export

    for path in export(args.dir):
        print(f"wrote {path}")
    return 0


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from audience_relay.topics import create_topics

    for r in asyncio.run(create_topics(settings)):
        print(f"{r.name:40s} partitions={r.partitions:<4d} {'created' if r.created else 'exists'}")
    return 0


def cmd_partitions(args: argparse.Namespace, settings: Settings) -> int:
    from aiokafka.errors import KafkaError

    from processors import partitions

    run = partitions.plan if args.action == "plan" else partitions.apply
    try:
        return asyncio.run(run(settings, args.to, sys.stdout, progress=not args.quiet))
    except KafkaError as exc:
        print(f"error: Kafka at {settings.kafka_bootstrap_servers} failed: {exc!r}", file=sys.stderr)
        return 1


def _more_than_one(text: str) -> int:
    value = int(text)
    if not 2 <= value <= 10_000:
        raise argparse.ArgumentTypeError("must be a partition count from 2 to 10000")
    return value


def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    broker = _local_kafka(settings)
    try:
        if args.action == "fetch":
            print(f"kafka jars in {fetch_jars(settings.local_dir, quiet=False)}")
        elif args.action == "start":
            print(f"kafka running at {broker.start()} (log: {broker.log_file})")
        elif args.action == "stop":
            print("kafka stopped" if broker.stop() else "kafka was not running")
        elif args.action == "status":
            running = broker.running()
            print(f"kafka {'running at ' + broker.bootstrap if running else 'not running'}")
            return 0 if running else 3
        elif args.action == "wipe":
            broker.wipe()
            print(f"removed {broker.home}")
    except LocalKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from devtools.up import run_up

    return run_up(settings, samples=args.samples, keep_running=not args.demo, keep_broker=args.keep_broker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audience-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingress", help="serve the Lytics webhook endpoint")
    p.add_argument(
        "--insecure", action="store_true", help="accept requests without credentials (local use only)"
    )
    p.set_defaults(func=cmd_ingress)

    p = sub.add_parser("worker", help="run the processors (split + membership); scale by adding workers")
    p.set_defaults(func=cmd_worker)

    sink = sub.add_parser(
        "sink", help="deliver membership changes to one destination (own consumer group), or resync it"
    ).add_subparsers(dest="sink_action", required=True)
    for name in ("pushly", "odp", "analytics"):
        p = sink.add_parser(name, help=f"deliver changes to {name} until SIGTERM")
        p.set_defaults(func=cmd_sink, name=name)
    p = sink.add_parser(
        "resync", help="send the current members (compacted membership topic) to one destination"
    )
    p.add_argument("name", choices=["pushly", "odp", "analytics"])
    p.add_argument(
        "--audience",
        action="append",
        default=[],
        metavar="ID",
        help="an audience id or slug (glob) to resync; repeat for more; default: every audience",
    )
    p.add_argument("--restart", action="store_true", help="start a new run even if one is unfinished")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sink_resync)

    dead = sub.add_parser("dead-letter", help="dead-letter tools").add_subparsers(
        dest="action", required=True
    )
    p = dead.add_parser("replay", help="re-deliver what a sink gave up, after the cause is fixed")
    p.add_argument("--sink", required=True, choices=["pushly", "odp", "analytics"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_dead_letter_replay)

    schemas = sub.add_parser("schemas", help="published record schemas").add_subparsers(
        dest="action", required=True
    )
    p = schemas.add_parser("export", help="write the JSON Schema of every published record")
    p.add_argument("dir", help="folder to write into")
    p.set_defaults(func=cmd_schemas_export)

    topics = sub.add_parser("topics", help="manage the Kafka topics").add_subparsers(
        dest="action", required=True
    )
    p = topics.add_parser("create", help="create every topic of the design (idempotent)")
    p.set_defaults(func=cmd_topics_create)

    parts = sub.add_parser(
        "partitions", help="raise the partition count, moving the membership state (docs/partitions.md)"
    ).add_subparsers(dest="action", required=True)
    for action, text in (
        ("plan", "print what apply would do and every check that fails; changes nothing"),
        ("apply", "raise the counts and move every key; safe to run again after an interruption"),
    ):
        p = parts.add_parser(action, help=text)
        p.add_argument("--to", required=True, type=_more_than_one, help="the new partition count")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_partitions)

    p = sub.add_parser("kafka", help="a local single-node Apache Kafka from Maven Central jars")
    p.add_argument("action", choices=["fetch", "start", "stop", "status", "wipe"])
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser(
        "up", help="run everything locally: broker, topics, ingress, and post the sample payloads"
    )
    p.add_argument("--samples", default="fixtures/samples", help="folder of sample payloads to post")
    p.add_argument("--demo", action="store_true", help="post the samples, show what landed, stop")
    p.add_argument("--keep-broker", action="store_true", help="leave the local broker running at the end")
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``audience-relay`` command."""
    args = build_parser().parse_args(argv)
    settings = _settings()
    logs.configure(settings.log_level)
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
