"""A recorded run judged against any of its strategies (summary.md judges against random).

    python -m training.active_learning.compare al-out/curves.json --baseline vapal-direction
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.paired import markdown, paired_differences


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.active_learning.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", type=Path, help="curves.json written by python -m training.active_learning")
    parser.add_argument("--baseline", default="random", help="the strategy every other one is paired with")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the t interval")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.curves.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: {args.curves}: {error}", file=sys.stderr)
        return 2
    if not isinstance(record, dict) or not isinstance(record.get("curves"), dict):
        print(f"error: {args.curves} has no \"curves\" table (not a curves.json of this program?)", file=sys.stderr)
        return 2
    tables = []
    try:
        for metric, title in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            rows = paired_differences(record["curves"], metric, args.baseline, args.confidence)
            tables.append(f"**{title}**\n\n{markdown(rows, title, args.baseline, args.confidence)}")
    except ValueError as error:
        print(f"error: {args.curves}: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
