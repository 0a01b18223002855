"""Choosing the port a component's web server binds, with one clear error when it cannot.

Rule (README *Ports*): a port set explicitly must be free, else the component exits 74 naming
the setting. A port left at its default may fall back: when the default is taken (a second worker
or sink of the same kind on one host), the operating system picks a free port, and the component
logs it. ``0`` always means "a free port, logged".
"""

from __future__ import annotations

import errno
import logging
import socket

from audience_relay.exits import ExitCode, Fatal

log = logging.getLogger("audience_relay.ports")


def _bind(host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers themselves bind (aiohttp, faust): a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return int(sock.getsockname()[1])


def web_port(host: str, port: int, *, setting: str, host_setting: str, fallback: bool) -> int:
    """The port to serve on at ``host``: ``port`` when free; a free one when ``port`` is 0, or when it
    is taken and ``fallback`` (the setting was left at its default). Raises ``Fatal`` otherwise.

    The port is released again before returning: the server binds it right after, and the small
    window in between is the price of telling faust its port before it starts.
    """
    try:
        return _bind(host, port)
    except socket.gaierror:
        raise Fatal(f"{host_setting}={host}: not a host name or address", ExitCode.CONFIG) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and fallback:
            chosen = _bind(host, 0)
            log.warning(
                f"default port {port} is taken: serving on a free port instead (set {setting} to fix it)",
                extra={"setting": setting, "default": port, "port": chosen},
            )
            return chosen
        if exc.errno == errno.EADDRINUSE:
            message = f"port {port} on {host} is already in use: stop what holds it or set {setting}"
        elif exc.errno == errno.EACCES:
            message = f"port {port} needs privileges this process lacks: set {setting} above 1023"
        elif exc.errno == errno.EADDRNOTAVAIL:
            raise Fatal(f"{host_setting}={host}: not an address of this host", ExitCode.CONFIG) from None
        else:
            message = f"cannot listen on {host}:{port} ({exc.strerror}): check {setting} and {host_setting}"
        raise Fatal(message, ExitCode.IOERR) from None
