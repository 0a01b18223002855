"""JSON Schema export of the published records (``audience-relay schemas export DIR``)."""

from __future__ import annotations

from pathlib import Path

import orjson

from schemas.records import PUBLISHED

COMMITTED = Path(__file__).resolve().parent / "json"


#: The JSON Schema dialect pydantic generates.
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_id(name: str) -> str:
    """A stable absolute URI naming one published schema (a name, not a download address)."""
    return f"urn:audience-relay:schema:{name}"


def rendered() -> dict[str, bytes]:
    """File name → JSON Schema bytes, for every published record model."""
    out: dict[str, bytes] = {}
    for name, model in PUBLISHED.items():
        schema = {"$schema": DIALECT, "$id": schema_id(name), **model.model_json_schema(mode="serialization")}
        out[f"{name}.schema.json"] = (
            orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
    return out


def export(directory: str | Path) -> list[Path]:
    """Write every schema into ``directory``; returns the paths written."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in rendered().items():
        path = target / name
        path.write_bytes(content)
        written.append(path)
    return written
