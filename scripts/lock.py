"""requirements.lock: write it (``make lock``) and check it against pyproject.toml and the venv.

Writing (no option): starts from the requirements in pyproject.toml (dependencies and the ``dev``
extra) and walks the installed distributions' metadata through every requirement whose environment
marker holds here, so packages in the venv that the project does not need stay out; prints
``name==version`` for each. ``make lock`` writes that to requirements.lock, which ``make install``,
``.ci/run`` and deploy/Dockerfile install from (as pip constraints) and ``make audit`` checks.

``--check``: pyproject.toml against the lock, installing nothing: every requirement of the project
(those whose marker holds here) is pinned, at a version its specifier allows, and every line of the
lock is one exact pin. ``make install`` runs it before pip, so a disagreement is one clear list of
problems rather than a resolver error or, worse, an unpinned package that silently installs newest.

``--check-installed``: the venv holds exactly the lock. Constraints only pin what they list, so a
dependency the lock misses (a new transitive one, say) would install at whatever is newest; this
finds it, and pins nothing requires any more.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PROJECT = Path(__file__).resolve().parents[1]
PYPROJECT = PROJECT / "pyproject.toml"
LOCK = PROJECT / "requirements.lock"
HEADER = "# Exact versions installed for audience-relay[dev]; regenerate with `make lock`."
#: What to do about the problems each check finds.
FIX_LOCK = "run `make lock` to bring requirements.lock in line with pyproject.toml"
FIX_VENV = "run `make install` to install the lock, or `make lock` to lock what is installed"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#=]+)$")


def _wanted(requirement: Requirement, extras: set[str]) -> bool:
    envs = [{"extra": e} for e in extras] or [{"extra": ""}]
    return requirement.marker is None or any(requirement.marker.evaluate(env) for env in envs)


def project_requirements(pyproject_text: str) -> list[Requirement]:
    """The project's own requirements (dependencies and the ``dev`` extra) whose marker holds here."""
    project = tomllib.loads(pyproject_text)["project"]
    roots = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return [r for r in roots if _wanted(r, set())]


def closure(roots: Iterable[Requirement | str]) -> dict[str, str]:
    """Canonical name → installed version of everything the requirements ``roots`` pull in.

    Raises ``importlib.metadata.PackageNotFoundError`` when one of them is not installed.
    """
    found: dict[str, str] = {}
    todo = [r if isinstance(r, Requirement) else Requirement(r) for r in roots]
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


def render(pins: Mapping[str, str]) -> str:
    """The lock file's text for ``pins`` (canonical name → version), sorted by name."""
    return "\n".join([HEADER, *(f"{name}=={pins[name]}" for name in sorted(pins))]) + "\n"


def parse_lock(text: str) -> tuple[dict[str, str], list[str]]:
    """The pins of a lock file (canonical name → version) and the problems with its lines."""
    pins: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            problems.append(f"requirements.lock line {number}: {line!r} is not an exact pin name==version")
            continue
        name, version = canonicalize_name(match["name"]), match["version"]
        try:
            Version(version)
        except InvalidVersion:
            problems.append(f"requirements.lock line {number}: {version!r} is not a version")
            continue
        if name in pins:
            problems.append(f"requirements.lock line {number}: {name} is pinned twice")
            continue
        pins[name] = version
    return pins, problems


def check_lock(requirements: Iterable[Requirement], pins: Mapping[str, str]) -> list[str]:
    """What keeps the lock from satisfying pyproject.toml's ``requirements`` (empty: nothing)."""
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if req.url:
            problems.append(f"{req}: a direct URL cannot be pinned in requirements.lock")
        elif name not in pins:
            problems.append(f"{req}: required by pyproject.toml but not in requirements.lock")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(
                f"{req}: requirements.lock pins {name}=={pins[name]}, which pyproject.toml does not allow"
            )
    return problems


def check_installed(installed: Mapping[str, str], pins: Mapping[str, str]) -> list[str]:
    """Where the venv's project closure ``installed`` and the lock's ``pins`` differ (empty: nowhere)."""
    problems = []
    for name in sorted(installed.keys() | pins.keys()):
        have, pinned = installed.get(name), pins.get(name)
        if pinned is None:
            problems.append(
                f"{name}=={have} is installed for the project but not pinned in requirements.lock"
            )
        elif have is None:
            problems.append(f"{name}=={pinned} is pinned in requirements.lock but nothing requires it")
        elif Version(have) != Version(pinned):
            problems.append(f"{name}: requirements.lock pins {pinned}, the venv has {have}")
    return problems


def _report(what: str, problems: list[str], fix: str) -> int:
    if not problems:
        print(f"{what}: agree")
        return 0
    print(f"{what}: {len(problems)} problem(s); {fix}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Print the lock, or check it (exit 1 listing every problem)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="pyproject.toml against the lock")
    parser.add_argument("--check-installed", action="store_true", help="the venv against the lock")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args(argv)
    try:
        requirements = project_requirements(args.pyproject.read_text())
    except (OSError, KeyError, tomllib.TOMLDecodeError, InvalidRequirement) as exc:
        print(f"cannot read the requirements of {args.pyproject}: {exc}", file=sys.stderr)
        return 1
    if not (args.check or args.check_installed):
        print(render(closure(requirements)), end="")
        return 0
    try:
        pins, problems = parse_lock(args.lock.read_text())
    except OSError as exc:
        print(f"cannot read {args.lock}: {exc}; {FIX_LOCK}", file=sys.stderr)
        return 1
    status = 0
    if args.check:
        problems += check_lock(requirements, pins)
        status |= _report("pyproject.toml and requirements.lock", problems, FIX_LOCK)
    if args.check_installed:
        try:
            installed = closure(requirements)
        except metadata.PackageNotFoundError as exc:
            print(
                f"the venv and requirements.lock: {exc.name} is not installed; run `make install`",
                file=sys.stderr,
            )
            return 1
        status |= _report("the venv and requirements.lock", check_installed(installed, pins), FIX_VENV)
    return status


if __name__ == "__main__":
    sys.exit(main())
