"""The exit codes of ``audience-relay``, defined once (README: *Exit codes*).

The 6x/7x codes are the BSD ``sysexits.h`` ones, which process supervisors and shell scripts
already know: 69 means "try again later", 77 and 78 mean "a person must change something".
A failure the CLI can explain is raised as ``Fatal`` (a message naming what to fix, and its code)
and printed as one line on stderr; nothing the operator can fix ends in a traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What each exit status of ``audience-relay`` means."""

    OK = 0
    #: The command failed for a reason given on stderr (none of the more specific ones below).
    FAILURE = 1
    #: Bad command line (argparse).
    USAGE = 2
    #: ``kafka status``: the local broker is not running.
    KAFKA_NOT_RUNNING = 3
    #: ``dead-letter replay``: some records were still refused by the destination.
    RECORDS_REFUSED = 4
    #: ``partitions plan|apply``: a check failed, nothing was changed.
    PARTITIONS_REFUSED = 5
    #: ``check``: at least one problem was found (each one is listed).
    CHECK_FAILED = 6
    #: EX_UNAVAILABLE: the Kafka brokers cannot be reached (within ``RELAY_STARTUP_TIMEOUT_SECONDS``).
    UNAVAILABLE = 69
    #: EX_SOFTWARE: an internal error (a bug); the log holds the details.
    SOFTWARE = 70
    #: EX_IOERR: a port is taken, or a file or folder cannot be written.
    IOERR = 74
    #: EX_NOPERM: Kafka was reached but the secured connection failed: credentials refused,
    #: certificate not trusted, or the listener speaks another security protocol.
    NOPERM = 77
    #: EX_CONFIG: a setting is invalid or names a missing file, or the cluster does not match them.
    CONFIG = 78


class Fatal(Exception):
    """A failure to report as one line (``message``, naming what to fix) and exit with ``code``.

    The CLI prints ``message`` on stderr and exits with ``code``. The message must never hold a
    secret. (Not a ``SystemExit``: asyncio lets those escape through the event loop instead of the
    awaiting code.)
    """

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message
