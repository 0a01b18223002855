"""scripts/lock.py: the lock CI installs from must agree with pyproject.toml and with the venv."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from scripts import lock


def reqs(*texts: str) -> list[Requirement]:
    return [Requirement(t) for t in texts]


def pyproject(deps: list[str], dev: list[str]) -> str:
    # A JSON array of strings is a TOML array of basic strings.
    lines = ["[project]", 'name = "x"', f"dependencies = {json.dumps(deps)}"]
    lines += ["[project.optional-dependencies]", f"dev = {json.dumps(dev)}"]
    return "\n".join(lines) + "\n"


def test_the_committed_lock_satisfies_pyproject() -> None:
    assert lock.main(["--check"]) == 0


def test_project_requirements_are_the_dependencies_and_dev_extra_that_apply_here() -> None:
    text = pyproject(["aiohttp>=3.14,<4", 'pywin32>=300; sys_platform == "win32"'], ["pytest>=8"])
    assert [str(r) for r in lock.project_requirements(text)] == ["aiohttp<4,>=3.14", "pytest>=8"]


def test_a_lock_that_satisfies_every_requirement_has_no_problem() -> None:
    pins = {"aiokafka": "0.14.0", "faust-streaming": "0.15.3", "pytest": "9.2.0"}
    requirements = reqs("aiokafka>=0.14,<0.15", "faust_streaming[rocksdict]>=0.15.3,<0.16", "pytest>=8")
    assert lock.check_lock(requirements, pins) == []


def test_a_requirement_missing_from_the_lock_is_named() -> None:
    [problem] = lock.check_lock(reqs("aiohttp>=3.14", "orjson>=3.10"), {"aiohttp": "3.14.5"})
    assert problem.startswith("orjson>=3.10:") and "not in requirements.lock" in problem


@pytest.mark.parametrize("pinned", ["0.13.2", "0.15.0"])
def test_a_locked_version_the_specifier_refuses_is_named(pinned: str) -> None:
    [problem] = lock.check_lock(reqs("aiokafka>=0.14,<0.15"), {"aiokafka": pinned})
    assert f"pins aiokafka=={pinned}" in problem and "does not allow" in problem


def test_a_direct_url_requirement_cannot_be_locked() -> None:
    [problem] = lock.check_lock(reqs("x @ https://example.com/x-1.0.tar.gz"), {"x": "1.0"})
    assert "direct URL" in problem


def test_lock_lines_must_be_exact_pins_once_each() -> None:
    pins, problems = lock.parse_lock(
        "# a comment\n\nFoo_Bar==1.0\nfoo-bar==2.0\nbaz>=1\nqux==1.0 ; python_version < '3.12'\nquux==one\n"
    )
    assert pins == {"foo-bar": "1.0"}
    assert [p.split(":")[0] for p in problems] == [f"requirements.lock line {n}" for n in (4, 5, 6, 7)]
    assert "pinned twice" in problems[0] and "not an exact pin" in problems[1]
    assert "not an exact pin" in problems[2] and "not a version" in problems[3]


def test_render_then_parse_gives_the_pins_back() -> None:
    pins = {"b": "2.0", "a": "1.0.post1"}
    text = lock.render(pins)
    assert text.splitlines()[0] == lock.HEADER and text.splitlines()[1:] == ["a==1.0.post1", "b==2.0"]
    assert lock.parse_lock(text) == (pins, [])


def test_the_venv_against_the_lock() -> None:
    assert lock.check_installed({"a": "1.0", "b": "2"}, {"a": "1.0.0", "b": "2.0"}) == []
    problems = lock.check_installed(
        {"a": "1.0", "new": "3.1", "b": "2.1"}, {"a": "1.0", "b": "2.0", "gone": "1"}
    )
    assert problems == [
        "b: requirements.lock pins 2.0, the venv has 2.1",
        "gone==1 is pinned in requirements.lock but nothing requires it",
        "new==3.1 is installed for the project but not pinned in requirements.lock",
    ]


def test_check_exits_non_zero_listing_every_problem_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "pyproject.toml"
    project.write_text(pyproject(["aiokafka>=0.14,<0.15", "orjson>=3.10"], ["pytest>=8"]))
    locked = tmp_path / "requirements.lock"
    locked.write_text("aiokafka==0.15.0\npytest==9.2.0\n")
    args = ["--check", "--pyproject", str(project), "--lock", str(locked)]
    assert lock.main(args) == 1
    err = capsys.readouterr().err
    assert "2 problem(s); run `make lock`" in err
    assert "pins aiokafka==0.15.0" in err and "orjson>=3.10: required by pyproject.toml" in err
    locked.write_text("aiokafka==0.14.0\norjson==3.10.0\npytest==9.2.0\n")
    assert lock.main(args) == 0
    assert lock.main(["--check", "--pyproject", str(project), "--lock", str(tmp_path / "none")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_check_installed_compares_the_installed_closure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # packaging is installed here (the lock script needs it) and requires nothing itself.
    version = metadata.version("packaging")
    assert metadata.requires("packaging") is None
    project = tmp_path / "pyproject.toml"
    project.write_text(pyproject(["packaging>=20"], []))
    locked = tmp_path / "requirements.lock"
    args = ["--check-installed", "--pyproject", str(project), "--lock", str(locked)]
    locked.write_text(f"packaging=={version}\n")
    assert lock.main(args) == 0
    locked.write_text(f"packaging=={version}.post999\nstale==1.0\n")
    assert lock.main(args) == 1
    err = capsys.readouterr().err
    assert f"packaging: requirements.lock pins {version}.post999, the venv has {version}" in err
    assert "stale==1.0 is pinned in requirements.lock but nothing requires it" in err
    assert "run `make install`" in err
    project.write_text(pyproject(["surely-not-installed-here>=1"], []))
    assert lock.main(args) == 1
    assert "surely-not-installed-here is not installed" in capsys.readouterr().err
