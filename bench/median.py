#!/usr/bin/env python3
"""Medians of the simulator's JSON summaries (bench/fleet.sh), and the
smoke checks CI runs on them: each scenario must have done what it measures.

    python3 bench/median.py SCENARIO [--smoke] run-1/summary.json run-2/summary.json ...
"""
import json
import math
import statistics
import sys


def main():
    scenario, *rest = sys.argv[1:]
    smoke = "--smoke" in rest
    runs = [json.load(open(path)) for path in rest if path != "--smoke"]
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    medians = {}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        if values:
            medians[key] = statistics.median(values)
    print(f"median of {len(runs)} run(s), scenario {scenario}:")
    for key, value in medians.items():
        print(f"  {key}: {value:g}")
    if smoke:
        problems = check(scenario, runs[-1])
        if problems:
            for p in problems:
                print(f"fleet smoke ({scenario}): {p}", file=sys.stderr)
            sys.exit(1)
        print(f"fleet smoke ({scenario}): ok")


def check(scenario, s):
    """What a working build must show, whatever the machine's speed."""
    hosts = s["hosts"]
    problems = []
    if scenario == "steady":
        if s["errors"] != 0:
            problems.append(f"{s['errors']} errors; expected none")
        if s["reports"] < hosts:
            problems.append(f"{s['reports']} reports in the window; expected at least one per host ({hosts})")
    elif scenario == "storm":
        if s["back"] < hosts:
            problems.append(f"only {s['back']} of {hosts} hosts came back after the restart")
    elif scenario == "waves":
        if len(s["waves"]) != 4:
            problems.append(f"{len(s['waves'])} waves done; expected 4")
        if s["installs"] != hosts:
            problems.append(f"{s['installs']} installs; expected one per host ({hosts})")
    elif scenario == "rollback":
        if s["received"] < hosts:
            problems.append(f"only {s['received']} of {hosts} hosts received the rollback")
    elif scenario == "decision":
        if s["failed_installs"] != 1:
            problems.append(f"{s['failed_installs']} hosts failed; expected only the canary")
        if not s["first_failing_check_to_decision_seconds"] > 0:
            problems.append("no decision measured")
    return problems


if __name__ == "__main__":
    main()
