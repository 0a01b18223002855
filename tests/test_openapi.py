"""ingress/openapi.yaml is a valid OpenAPI 3 document and stays in step with the ingress's routes.

The statuses each route can answer are read from the ingress's code (its AST), not from a copy of
the document: a new ``_error(4xx, ...)`` or ``status=`` in a handler, or a new route, fails here
until the document says so; a documented status the code can no longer answer fails too.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import aiohttp
import openapi_spec_validator
import pytest
import yaml
from aiohttp import web

import ingress.access as ingress_access
import ingress.app as ingress_app
import ingress.guard as ingress_guard
from audience_relay.settings import Settings
from ingress.app import OPENAPI_PATH, build_app, build_ops_app
from tests.conftest import RunningIngress

KEY = {"X-API-KEY": "key-current"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _document() -> dict[str, Any]:
    return yaml.safe_load(OPENAPI_PATH.read_text())  # type: ignore[no-any-return]


def _documented() -> dict[tuple[str, str], set[int]]:
    """(METHOD, path) → the statuses the document gives that operation."""
    out: dict[tuple[str, str], set[int]] = {}
    for path, item in _document()["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                out[(method.upper(), path)] = {int(code) for code in operation["responses"]}
    return out


def _routes(settings: Settings) -> dict[tuple[str, str], str]:
    """(METHOD, path) → handler name, for every route the real application registers."""
    app: web.Application = build_app(settings)
    out: dict[tuple[str, str], str] = {}
    # /metrics lives on the operations port (RELAY_INGRESS_METRICS_PORT) unless that is the main one.
    for routes in (build_ops_app(app).router.routes(), app.router.routes()):
        for route in routes:
            info = route.resource.get_info() if route.resource is not None else {}
            path = info.get("path") or info.get("formatter")
            out[(route.method, str(path))] = route.handler.__name__
    return out


class _StatusFinder(ast.NodeVisitor):
    """Statuses a function answers: ``_error(<int>, ...)``, ``status=<ints>``, and the implicit 200."""

    RESPONSE_CALLS = {"Response", "json_response"}
    ERROR_CALLS = {"_error", "error_response"}

    def __init__(self) -> None:
        self.statuses: set[int] = set()
        self.calls: set[str] = set()

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        self.calls.add(name)
        if name in self.ERROR_CALLS and node.args and isinstance(node.args[0], ast.Constant):
            self.statuses.add(int(node.args[0].value))
        status = next((kw.value for kw in node.keywords if kw.arg == "status"), None)
        if status is not None:
            self.statuses |= {
                int(c.value)
                for c in ast.walk(status)
                if isinstance(c, ast.Constant) and isinstance(c.value, int) and 100 <= c.value < 600
            }
        elif name in self.RESPONSE_CALLS:
            self.statuses.add(200)
        self.generic_visit(node)


def _module_functions() -> dict[str, ast.AST]:
    """The ingress's functions (the app's module and those of its middlewares), nested ones included."""
    out: dict[str, ast.AST] = {}
    for module in (ingress_guard, ingress_access, ingress_app):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.setdefault(node.name, node)
    return out


def statuses_in_code(handler: str) -> set[int]:
    """Every status ``handler`` can answer, following the calls it makes into the same module."""
    functions = _module_functions()
    seen: set[str] = set()
    found: set[int] = set()
    todo = [handler]
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        finder = _StatusFinder()
        finder.visit(functions[name])
        found |= finder.statuses
        todo.extend(finder.calls)
    return found


def middleware_statuses() -> set[int]:
    """Statuses answered in front of the routes: by the middlewares the application installs, and by
    the listener's request hook (``ingress.guard._bounds_bodies``: the body deadline)."""
    functions = _module_functions()
    names: set[str] = {"_bounds_bodies"}
    for node in ast.walk(functions["build_app"]):
        if isinstance(node, ast.keyword) and node.arg == "middlewares":
            names |= {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
    return set().union(*(statuses_in_code(n) for n in names)) if names else set()


def test_document_is_valid_openapi_3() -> None:
    document = _document()
    assert document["openapi"].startswith("3.")
    openapi_spec_validator.validate(document)


def test_every_route_is_documented_and_every_documented_route_exists(settings: Settings) -> None:
    routes = _routes(settings)
    documented = _documented()
    assert set(routes) == set(documented), (
        f"routes not in the document: {sorted(set(routes) - set(documented))}; "
        f"documented but not served: {sorted(set(documented) - set(routes))}"
    )


def test_every_status_the_code_answers_is_documented_and_no_other(settings: Settings) -> None:
    documented = _documented()
    in_front = middleware_statuses()
    for key, handler in _routes(settings).items():
        in_code = statuses_in_code(handler)
        assert in_code, f"found no status in {handler}: the AST reader no longer understands the code"
        # A route may also document what the middlewares in front of it answer (401, 408, 429).
        assert in_code <= documented[key] <= in_code | in_front, (
            f"{key} ({handler}): the code answers {sorted(in_code)} (middlewares {sorted(in_front)}), "
            f"the document says {sorted(documented[key])}"
        )
    every_documented = set().union(*documented.values())
    assert in_front <= every_documented


def test_status_reader_sees_what_the_webhook_handler_answers() -> None:
    # A known fact, so the AST reader itself cannot silently find nothing.
    assert {200, 400, 404, 413, 415, 429, 503} <= statuses_in_code("receive_webhook")
    assert {401, 408, 429} <= middleware_statuses()


async def test_document_is_served_with_credentials(ingress: RunningIngress) -> None:
    committed = OPENAPI_PATH.read_bytes()
    async with aiohttp.ClientSession() as http:
        async with http.get(ingress.url + "/openapi.yaml", headers=KEY) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/yaml"
            assert await resp.read() == committed
        async with http.get(ingress.url + "/openapi.yaml") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        async with http.head(ingress.url + "/healthz", headers=KEY) as resp:
            assert resp.status == 405  # no implicit HEAD routes: the document lists every route
        async with http.head(ingress.url + "/healthz") as resp:
            assert resp.status == 401  # no route serves it: credentials first (deny by default)


@pytest.mark.parametrize(
    "body, content_type, status, error",
    [
        (b"grant_type=client_credentials", "multipart/form-data", 400, "invalid_request"),
        (b"x" * 5000, "application/x-www-form-urlencoded", 413, "invalid_request"),
        (b"grant_type=password", "application/x-www-form-urlencoded", 400, "unsupported_grant_type"),
    ],
    ids=["multipart-without-boundary", "over-the-size-limit", "wrong-grant"],
)
async def test_token_endpoint_answers_unreadable_bodies_with_json(
    body: bytes, content_type: str, status: int, error: str
) -> None:
    # Regression: a multipart body without a boundary was a 500, an oversized form a text/plain 413.
    from tests.conftest import NO_BROKER, make_settings, start_ingress

    running = await start_ingress(make_settings(NO_BROKER, max_body_bytes=4096), wait_connected=False)
    try:
        headers = {"Content-Type": content_type}
        async with (
            aiohttp.ClientSession() as http,
            http.post(running.url + "/oauth/token", data=body, headers=headers) as resp,
        ):
            assert resp.status == status
            assert await resp.json() == {"error": error}
    finally:
        await running.runner.cleanup()
