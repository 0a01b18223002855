"""How every long-running command answers SIGHUP, SIGTERM and SIGINT: one place, one behaviour.

- ``ingress``: SIGHUP reloads the credentials (keys file) and the TLS certificate; SIGTERM/SIGINT
  drain in-flight requests, flush the producer and exit 0.
- ``worker``: SIGHUP reloads the query routes' credentials (keys file); SIGTERM/SIGINT are faust's
  own (hand the partitions over, exit 0).
- ``sink NAME``: SIGHUP is logged, nothing to reload (its settings come from the environment);
  SIGTERM/SIGINT finish and commit the in-flight batches and exit 0.
- ``up``: SIGHUP reloads its ingress's credentials; SIGTERM/SIGINT stop the worker and sinks, then it.

SIGHUP's default action is to terminate the process, and the README's key rotation sends it: a
command that cannot reload anything must still survive it. ``defer_hangup`` covers the start-up
(imports, broker checks) before the event loop's handlers exist: a SIGHUP then is remembered and
answered as soon as ``install`` runs. ``install`` registers the handlers on the running loop (the
callbacks run between other callbacks, so they can touch request state without locks) and returns
the function that removes them at shutdown, after which SIGHUP is ignored: a hangup during the
final flush must not cut it short.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("audience_relay.signals")

_pending_hangup = False

#: What SIGTERM and SIGINT stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _remember_hangup(signum: int, frame: FrameType | None) -> None:
    global _pending_hangup
    _pending_hangup = True


def defer_hangup() -> None:
    """From now until ``install``: a SIGHUP is remembered (and answered by ``install``), not fatal."""
    signal.signal(signal.SIGHUP, _remember_hangup)


def install(
    loop: asyncio.AbstractEventLoop,
    component: str,
    *,
    stop: Callable[[], None] | None = None,
    reload: Callable[[], object] | None = None,
) -> Callable[[], None]:
    """SIGHUP calls ``reload`` (or logs that ``component`` has nothing to reload); SIGTERM/SIGINT
    call ``stop`` when given (else they stay with whoever owns them, e.g. faust's worker).

    Returns the function that removes these handlers; SIGHUP is ignored from then on.
    """
    global _pending_hangup

    def on_hangup() -> None:
        if reload is None:
            log.info(
                "SIGHUP received: nothing to reload (settings come from the environment; restart to "
                "change them)",
                extra={"component": component},
            )
            return
        log.info("SIGHUP received: reloading", extra={"component": component})
        try:
            reload()
        except Exception as exc:  # a reload that fails must not take the process down with it
            # The type only: an unexpected exception's message could quote what it was reading.
            log.error("reload failed", extra={"component": component, "error_type": type(exc).__name__})

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if stop is not None:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop)
    if _pending_hangup:
        _pending_hangup = False
        loop.call_soon(on_hangup)

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if stop is not None:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    return remove
