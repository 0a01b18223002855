"""``make audit``: pip-audit over requirements.lock, failing on any known vulnerability.

Tries PyPI's vulnerability data first, then OSV. A package with a known vulnerability fails the run
unless IGNORED names it with the reason. When neither service answers (a sandbox that reaches only
the package index), the run says loudly that nothing was audited and does not fail: that is a fact
about the network, not about the dependencies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Vulnerability id → why it is accepted (none today).
IGNORED: dict[str, str] = {}


def audit(lock: Path, service: str) -> list[dict[str, object]]:
    """pip-audit's per-dependency results for ``lock`` from ``service`` (empty if it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        args = [sys.executable, "-m", "pip_audit", "-r", str(lock), "--no-deps", "--disable-pip"]
        args += ["-s", service, "-f", "json", "-o", str(out), "--progress-spinner", "off"]
        for vuln in IGNORED:
            args += ["--ignore-vuln", vuln]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if not out.exists():
            print(f"pip-audit ({service}) failed: {done.stderr.strip().splitlines()[-1:]}")
            return []
        return list(json.loads(out.read_text())["dependencies"])


def main(lock: str = "requirements.lock") -> int:
    for service in ("pypi", "osv"):
        deps = audit(Path(lock), service)
        audited = [d for d in deps if "skip_reason" not in d]
        if not audited:
            continue
        vulnerable = [d for d in audited if d.get("vulns")]
        for dep in vulnerable:
            for vuln in dep["vulns"]:  # type: ignore[attr-defined]
                print(f"{dep['name']}=={dep['version']}: {vuln['id']} fixed in {vuln.get('fix_versions')}")
        print(f"pip-audit ({service}): {len(audited)} packages audited, {len(vulnerable)} vulnerable")
        return 1 if vulnerable else 0
    print(
        "NOT AUDITED: no vulnerability service answered (PyPI's JSON API, OSV); run make audit where one does"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
