"""Print the exact versions installed for audience-relay and its dev extras (the project excluded).

Starts from the requirements in pyproject.toml (dependencies and the ``dev`` extra) and walks the
installed distributions' metadata through every requirement whose environment marker holds here,
so packages in the venv that the project does not need stay out. ``make lock`` writes the result
to requirements.lock, which ``make audit`` checks.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _wanted(requirement: Requirement, extras: set[str]) -> bool:
    envs = [{"extra": e} for e in extras] or [{"extra": ""}]
    return requirement.marker is None or any(requirement.marker.evaluate(env) for env in envs)


def closure(roots: list[str]) -> dict[str, str]:
    """Canonical name → installed version of everything the requirement strings ``roots`` pull in."""
    found: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        found[canonicalize_name(req.name)] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if _wanted(sub, set(req.extras)):
                todo.append(sub)
    return found


def main() -> int:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    roots = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = closure([r for r in roots if _wanted(Requirement(r), set())])
    print("# Exact versions installed for audience-relay[dev]; regenerate with `make lock`.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
