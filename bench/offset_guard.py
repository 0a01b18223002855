"""Reproduce faust 0.15's loss under rebalances with full stream buffers, with and without our guard.

First the deterministic reproduction of tests/test_offset_guard.py (a record held in faust's fetch
loop across a real rebalance) with faust's consumer, the guarded one, and the guarded one with only
its commit check. Then the scenario of tests/test_rebalance.py (workers 1 → 3 → 2 while raw bodies
keep arriving, so partitions move while stream buffers are full), ``--runs`` times with the offset
guard off (``RELAY_OFFSET_GUARD=false``: faust's own consumer) and on; per run it prints the changes
missing or doubled against the pure oracle, whether the changelog table equals the oracle's, and
what the guard did (from the worker logs).

    python -m bench.offset_guard [--runs 3] [--modes off,on]
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from bench.common import arguments, broker
from tests.test_offset_guard import RECORDS, run_window
from tests.test_rebalance import join_and_leave_mid_stream

GUARD_LINES = {
    "seek back": re.compile(r"seeking back to it"),
    "given back": re.compile(r"not handed to the streams: seeking back"),
    "read marks refused (logged)": re.compile(r"not marking .* read"),
}


def guard_actions(logs: Path, pattern: str = "w*.log") -> dict[str, int]:
    text = "".join(p.read_text(errors="replace") for p in logs.glob(pattern))
    return {name: len(rx.findall(text)) for name, rx in GUARD_LINES.items()}


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="off,on", help="guard modes to run, in order")
    parser.add_argument("--timeout", type=float, default=150, help="seconds to wait for the outputs")
    args = parser.parse_args()
    totals: dict[str, list[int]] = {}
    with broker() as (bootstrap, _):
        for guard in ("off", "on", "commit"):
            tmp = Path(tempfile.mkdtemp(prefix=f"window-{guard}-"))
            processed, committed, _ = await run_window(bootstrap, tmp, guard)
            missing = sorted(set(range(RECORDS)) - processed)
            print(
                f"held record, guard {guard}: {len(missing)} of {RECORDS} records never processed"
                + (f" (offsets {missing[0]}..{missing[-1]})" if missing else "")
                + f", committed offset {committed}; guard: {guard_actions(tmp, 'parker.log')}",
                flush=True,
            )
        for mode in args.modes.split(","):
            for run in range(args.runs):
                tmp = Path(tempfile.mkdtemp(prefix=f"guard-{mode}-"))
                out = await join_and_leave_mid_stream(
                    bootstrap, tmp, guard=mode == "on", timeout=args.timeout
                )
                actions = guard_actions(tmp) if mode == "on" else {}
                totals.setdefault(mode, []).append(len(out.missing))
                print(
                    f"guard {mode} run {run + 1}: {out.segment_events:,} segment events, "
                    f"{out.expected:,} expected changes: {len(out.missing)} missing, "
                    f"{len(out.doubled)} doubled, {len(out.wrong)} different, "
                    f"{len(out.unexpected)} unexpected, table {'equal' if out.table_equal else 'DIFFERENT'}"
                    + (f"; guard: {actions}" if actions else "")
                    + f"; logs {tmp}",
                    flush=True,
                )
    for mode, missing in totals.items():
        lossy = sum(1 for m in missing if m)
        print(f"guard {mode}: {lossy}/{len(missing)} runs lost changes ({sum(missing)} changes in all)")


if __name__ == "__main__":
    asyncio.run(main())
