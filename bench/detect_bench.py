"""Detection cost: microseconds per first flight, for each detector on its own captures and for
the whole decision with every installed detector enabled.

    python bench/detect_bench.py [--json results.json]

Each figure is the best of 5 repeats of a timed loop over a fresh Peek (so no cached parse is
reused between iterations), on the captures in tests/data/.
"""

import argparse
import json
import os
import platform
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l4router.detection import Peek  # noqa: E402
from l4router.detection.decision import DetectorSet  # noqa: E402
from l4router.detection.registry import detectors_for, installed_detectors  # noqa: E402
from l4router.parsers.http2 import EMPTY_SETTINGS  # noqa: E402
from tests.captures import ELICITED, EXPECTED, capture  # noqa: E402


def per_call_us(function, number):
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    detectors = {d.name: d for d in installed_detectors()}
    everything = DetectorSet(detectors_for(detectors.values(), "tcp"))
    rows = []
    for name, (protocol, _) in sorted(EXPECTED.items(), key=lambda item: item[1][0]):
        data = capture(name)
        elicited = EMPTY_SETTINGS if name in ELICITED else b""
        detector = detectors[protocol]
        own = per_call_us(lambda: detector.detect(Peek(data, elicited=elicited)), args.number)
        whole = per_call_us(lambda: everything.decide(Peek(data, elicited=elicited)), args.number)
        rows.append(
            {
                "capture": name,
                "protocol": protocol,
                "bytes": len(data),
                "detector_us": round(own, 2),
                "decision_us": round(whole, 2),
            }
        )
    print(
        f"# detection cost, {platform.python_implementation()} {platform.python_version()}, "
        f"{len(everything.detectors)} TCP detectors, {os.cpu_count()} cores"
    )
    print(f"{'capture':34} {'protocol':9} {'bytes':>5} {'detector µs':>12} {'decision µs':>12}")
    for row in rows:
        print(
            f"{row['capture']:34} {row['protocol']:9} {row['bytes']:>5} "
            f"{row['detector_us']:>12.2f} {row['decision_us']:>12.2f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": platform.python_version(), "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
