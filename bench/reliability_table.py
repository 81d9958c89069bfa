"""Turns the figures the reliability suite recorded (tests/artifacts/reliability/*.json) into
docs/RELIABILITY.md.

    python -m pytest tests/test_reliability.py && python bench/reliability_table.py
    RELIABILITY_SCALE=10 FUZZ_EXAMPLES=50000 python -m pytest tests/test_reliability.py \\
        && python bench/reliability_table.py                           # the long run
"""

import datetime
import json
import os
import pathlib
import platform

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / "artifacts" / "reliability"
OUTPUT = ROOT / "docs" / "RELIABILITY.md"


def cell(value):
    if isinstance(value, dict):
        return "; ".join(f"{k}: {cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return str(value)


def main():
    cases = {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))}
    if not cases:
        raise SystemExit(f"no results in {RESULTS}: run the reliability suite first")
    scale = {case.get("scale") for case in cases.values()}
    lines = [
        "# Reliability and security, measured",
        "",
        f"Produced by `python -m pytest tests/test_reliability.py && python "
        f"bench/reliability_table.py` on {datetime.date.today()}, "
        f"{platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores, RELIABILITY_SCALE="
        f"{', '.join(map(str, sorted(scale)))}. Every case runs the real `twistd -n l4router` on "
        "loopback; `fds`, `rss_mib` and `timers` are the router's own `process_open_fds`, "
        "`process_resident_memory_bytes` and `l4router_reactor_delayed_calls` from /metrics.",
        "",
        "| case | figures | result |",
        "|---|---|---|",
    ]
    for name, figures in cases.items():
        result = figures.pop("result", "")
        figures.pop("scale", None)
        lines.append(f"| {name} | {cell(figures)} | {result} |")
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUTPUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
