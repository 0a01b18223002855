"""JSON Schema export of the published records (``audience-relay schemas export DIR``)."""

from __future__ import annotations

from pathlib import Path

import orjson

from schemas.records import PUBLISHED

COMMITTED = Path(__file__).resolve().parent / "json"


def rendered() -> dict[str, bytes]:
    """File name → JSON Schema bytes, for every published record model."""
    return {
        f"{name}.schema.json": orjson.dumps(
            model.model_json_schema(mode="serialization"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for name, model in PUBLISHED.items()
    }


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
