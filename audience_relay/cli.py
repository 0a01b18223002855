"""``audience-relay``: one command, a subcommand per component.

Settings come from the environment (see README), loaded only by the subcommands that need them:
``--help`` and ``schemas export`` read none, ``kafka …`` only the local broker's two. Every
component checks its connection to Kafka (``audience_relay.preflight``) and its web port before
it starts. A failure an operator can fix ends with one ``error:`` line on stderr and the exit
code of ``audience_relay.exits`` (README: *Exit codes*), never with a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import ValidationError
from pydantic_settings import SettingsError

from audience_relay import logs, signals
from audience_relay.exits import ExitCode, Fatal
from audience_relay.keys import KeysFileError
from audience_relay.names import SINKS, Names
from audience_relay.settings import LocalSettings, Settings

log = logging.getLogger("audience_relay")

#: The commands that run until stopped: SIGHUP must never kill them (README "Signals").
LONG_RUNNING = frozenset({"ingress", "worker", "sink", "up"})

S = TypeVar("S", bound=LocalSettings)


def load_settings(kind: type[S]) -> S:
    """``kind()`` from the environment, or ``Fatal`` (exit 78) with one line per invalid setting.

    No line holds a value: a malformed secret must not be printed.
    """
    try:
        return kind()
    except SettingsError as exc:
        raise Fatal(f"invalid settings: {exc}: {exc.__cause__}", ExitCode.CONFIG) from None
    except ValidationError as exc:
        lines: list[str] = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            lines.extend(
                f"invalid setting {where}: {m}" if where else f"invalid setting: {m}"
                for m in message.splitlines()
            )
        raise Fatal("\n".join(lines), ExitCode.CONFIG) from None


def _kafka_ready(settings: Settings, topics: Sequence[str] = ()) -> None:
    from audience_relay.preflight import run_preflight

    run_preflight(settings, topics=topics)


def cmd_ingress(args: argparse.Namespace, settings: Settings) -> int:
    from audience_relay import ports
    from audience_relay.preflight import KafkaUnreachable, run_preflight
    from ingress.app import run

    for setting, port in (
        ("RELAY_INGRESS_PORT", settings.ingress_port),
        ("RELAY_INGRESS_METRICS_PORT", settings.ingress_metrics_port),
    ):
        if port:  # 0: any free port
            ports.web_port(
                settings.ingress_host,
                port,
                setting=setting,
                host_setting="RELAY_INGRESS_HOST",
                fallback=False,
            )
    try:
        run_preflight(settings, wait=0)
    except KafkaUnreachable as exc:
        # The ingress starts without Kafka (answering 503) and connects when it can; bad
        # credentials or TLS settings, which no waiting cures, still stop it (above).
        log.warning("kafka not reachable at start; answering 503 until it is", extra={"reason": exc.message})
    try:
        run(settings, insecure=args.insecure)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # the ingress refuses to start: its message names the setting
            raise Fatal(exc.code, ExitCode.CONFIG) from None
        raise
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from audience_relay import ports
    from processors.worker import run_worker

    port = ports.web_port(
        settings.worker_web_host,
        settings.worker_web_port,
        setting="RELAY_WORKER_WEB_PORT",
        host_setting="RELAY_WORKER_WEB_HOST",
        fallback="worker_web_port" not in settings.model_fields_set,
    )
    settings = settings.model_copy(update={"worker_web_port": port})
    _kafka_ready(settings)
    log.info("worker web server", extra={"host": settings.worker_web_host, "port": port})
    run_worker(settings)
    return 0


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.destinations import build
    from sinks.run import run_sink, sink_web_port

    spec = build(args.name, settings)  # a destination without its URL or secret stops here (78)
    settings = settings.model_copy(update={"sink_web_port": sink_web_port(settings, args.name)})
    names = Names.from_settings(settings)
    # What it reads, and what it writes beside the destination (dead letters, the delivery log).
    _kafka_ready(settings, [*spec.topics, names.topics.dead_letter, names.topics.deliveries])
    run_sink(settings, args.name)
    return 0


def cmd_sink_resync(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.resync import resync

    names = Names.from_settings(settings)
    _kafka_ready(settings, [names.topics.membership, names.topics.deliveries, names.topics.dead_letter])
    report = asyncio.run(
        resync(settings, args.name, args.audience, restart=args.restart, progress=not args.quiet)
    )
    print(
        f"resync to {args.name}{' (resumed)' if report.resumed else ''}: {report.members} members, "
        f"{report.delivered} delivered, {report.already_sent} sent by the interrupted run before, "
        f"{report.filtered} filtered, {report.dead_lettered + report.unknown_identifier} dead-lettered "
        f"({report.unknown_identifier} without the identifier to send)"
    )
    return ExitCode.OK


def cmd_dead_letter_replay(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.replay import replay_dead_letters

    _kafka_ready(settings, [Names.from_settings(settings).topics.dead_letter])
    report = asyncio.run(replay_dead_letters(settings, args.sink, progress=not args.quiet))
    print(
        f"replayed to {args.sink}: {report.delivered} delivered, {report.refused} still refused "
        f"(dead-lettered again, replayable), {report.superseded} superseded (skipped)"
    )
    return ExitCode.OK if report.refused == 0 else ExitCode.RECORDS_REFUSED


def cmd_schemas_export(args: argparse.Namespace, settings: None) -> int:
    from schemas.export import export

    for path in export(args.dir):
        print(f"wrote {path}")
    return 0


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from audience_relay.topics import create_topics

    _kafka_ready(settings)
    for r in asyncio.run(create_topics(settings)):
        print(f"{r.name:40s} partitions={r.partitions:<4d} {'created' if r.created else 'exists'}")
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from audience_relay.check import run_check

    return asyncio.run(run_check(settings, sys.stdout))


def cmd_partitions(args: argparse.Namespace, settings: Settings) -> int:
    from processors import partitions

    _kafka_ready(settings)
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


def cmd_kafka(args: argparse.Namespace, settings: LocalSettings) -> int:
    from devtools.localkafka import LocalKafka, LocalKafkaError, fetch_jars

    if args.secure and args.action != "start":
        print("error: --secure applies to `kafka start` only", file=sys.stderr)
        return ExitCode.USAGE
    broker = LocalKafka(settings.local_dir, port=settings.local_kafka_port, secure=args.secure)
    try:
        if args.action == "fetch":
            print(f"kafka jars in {fetch_jars(settings.local_dir, quiet=False)}")
        elif args.action == "start" and args.secure:
            bootstrap = broker.start()
            # Comments and exports only, so `eval "$(audience-relay kafka start --secure)"` works; the
            # password is read from its 0600 file when the line runs, so it never lands in a log.
            print(f"# kafka running at {bootstrap}, SASL_SSL (log: {broker.log_file})")
            print("# settings for the relay's components:")
            print("\n".join(broker.client_security().exports()))
        elif args.action == "start":
            print(f"kafka running at {broker.start()} (log: {broker.log_file})")
        elif args.action == "stop":
            print("kafka stopped" if broker.stop() else "kafka was not running")
        elif args.action == "status":
            running = broker.running()
            protocol = broker.formatted_protocol() or "PLAINTEXT"
            print(f"kafka {f'running at {broker.bootstrap} ({protocol})' if running else 'not running'}")
            return ExitCode.OK if running else ExitCode.KAFKA_NOT_RUNNING
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
    """The command line; each subcommand names the settings it loads (``settings``: a model or None)."""
    parser = argparse.ArgumentParser(prog="audience-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingress", help="serve the Lytics webhook endpoint")
    p.add_argument(
        "--insecure", action="store_true", help="accept requests without credentials (local use only)"
    )
    p.set_defaults(func=cmd_ingress, settings=Settings)

    p = sub.add_parser("worker", help="run the processors (split + membership); scale by adding workers")
    p.set_defaults(func=cmd_worker, settings=Settings)

    sink = sub.add_parser(
        "sink", help="deliver membership changes to one destination (own consumer group), or resync it"
    ).add_subparsers(dest="sink_action", required=True)
    for name in SINKS:
        p = sink.add_parser(name, help=f"deliver changes to {name} until SIGTERM")
        p.set_defaults(func=cmd_sink, name=name, settings=Settings)
    p = sink.add_parser(
        "resync", help="send the current members (compacted membership topic) to one destination"
    )
    p.add_argument("name", choices=SINKS)
    p.add_argument(
        "--audience",
        action="append",
        default=[],
        metavar="ID",
        help="an audience id or slug (glob) to resync; repeat for more; default: every audience",
    )
    p.add_argument("--restart", action="store_true", help="start a new run even if one is unfinished")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sink_resync, settings=Settings)

    dead = sub.add_parser("dead-letter", help="dead-letter tools").add_subparsers(
        dest="action", required=True
    )
    p = dead.add_parser("replay", help="re-deliver what a sink gave up, after the cause is fixed")
    p.add_argument("--sink", required=True, choices=SINKS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_dead_letter_replay, settings=Settings)

    schemas = sub.add_parser("schemas", help="published record schemas").add_subparsers(
        dest="action", required=True
    )
    p = schemas.add_parser("export", help="write the JSON Schema of every published record")
    p.add_argument("dir", help="folder to write into")
    p.set_defaults(func=cmd_schemas_export, settings=None)

    topics = sub.add_parser("topics", help="manage the Kafka topics").add_subparsers(
        dest="action", required=True
    )
    p = topics.add_parser("create", help="create every topic of the design (idempotent)")
    p.set_defaults(func=cmd_topics_create, settings=Settings)

    p = sub.add_parser(
        "check",
        help="check a configuration before going live: settings, Kafka, topics, destinations",
    )
    p.set_defaults(func=cmd_check, settings=Settings)

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
        p.set_defaults(func=cmd_partitions, settings=Settings)

    p = sub.add_parser("kafka", help="a local single-node Apache Kafka from Maven Central jars")
    p.add_argument("action", choices=["fetch", "start", "stop", "status", "wipe"])
    p.add_argument(
        "--secure",
        action="store_true",
        help="start: a SASL_SSL listener (SCRAM users, self-signed CA under the broker's folder); "
        "prints the KAFKA_* settings to use",
    )
    p.set_defaults(func=cmd_kafka, settings=LocalSettings)

    p = sub.add_parser(
        "up", help="run everything locally: broker, topics, ingress, and post the sample payloads"
    )
    p.add_argument("--samples", default="fixtures/samples", help="folder of sample payloads to post")
    p.add_argument("--demo", action="store_true", help="post the samples, show what landed, stop")
    p.add_argument("--keep-broker", action="store_true", help="leave the local broker running at the end")
    p.set_defaults(func=cmd_up, settings=Settings)
    return parser


def _os_failure(exc: OSError) -> Fatal:
    """An OS error that reached the top, as one line: a taken port or a file that cannot be used."""
    if exc.errno == errno.EADDRINUSE:
        return Fatal(f"a port is already in use ({exc.strerror}): check the *_PORT settings", ExitCode.IOERR)
    if isinstance(exc, FileNotFoundError):
        return Fatal(f"{exc.filename}: no such file or folder", ExitCode.CONFIG)
    where = f"{exc.filename}: " if exc.filename else ""
    return Fatal(f"{where}{exc.strerror or type(exc).__name__}", ExitCode.IOERR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``audience-relay`` command."""
    args = build_parser().parse_args(argv)  # exits 2 on a usage error
    if args.command in LONG_RUNNING:
        # Before the slow imports and start-up: a SIGHUP now is answered once the command can
        # reload, instead of killing it (audience_relay.signals).
        signals.defer_hangup()
    func: Callable[[argparse.Namespace, object], int] = args.func
    try:
        settings = load_settings(args.settings) if args.settings is not None else None
        if isinstance(settings, Settings):
            logs.configure(settings.log_level, settings.log_repeat_seconds)
        else:
            logs.configure("INFO")
        return int(func(args, settings))
    except Fatal as exc:
        failure = exc
    except KeysFileError as exc:  # credentials that cannot be used (the message holds no secret)
        failure = Fatal(str(exc), ExitCode.CONFIG)
    except KafkaConnectionError as exc:
        failure = Fatal(f"lost the connection to Kafka ({exc}): is the cluster up?", ExitCode.UNAVAILABLE)
    except OSError as exc:
        failure = _os_failure(exc)
    except KeyboardInterrupt:
        return 130
    except KafkaError as exc:
        failure = Fatal(f"Kafka refused the request: {type(exc).__name__}: {exc}", ExitCode.FAILURE)
    except Exception as exc:
        # A bug: the traceback goes to the log (JSON), the operator gets one line.
        log.critical("internal error", exc_info=True)
        failure = Fatal(f"internal error ({type(exc).__name__}): see the log line above", ExitCode.SOFTWARE)
    for line in failure.message.splitlines():
        print(f"error: {line}", file=sys.stderr)
    return int(failure.code)


if __name__ == "__main__":
    sys.exit(main())
