"""Markdown summaries of a coverage report or a mutmut result list (run.sh calls it).

python summarize.py coverage coverage.json
python summarize.py mutation mutants.txt
"""

from __future__ import annotations

import collections
import json
import sys


def coverage(path: str) -> str:
    """One row per module of pytest-cov's JSON report: statements, missed, branches, partial, cover.

    :param path: The report (``--cov-report=json:PATH``).
    """
    with open(path) as f:
        report = json.load(f)
    rows = ["| module | statements | missed | branches | partial | cover |", "|---|---|---|---|---|---|"]
    for name, f in sorted(report["files"].items()):
        s = f["summary"]
        rows.append(
            f"| `{name}` | {s['num_statements']} | {s['missing_lines']} | {s['num_branches']} "
            f"| {s['num_partial_branches']} | {s['percent_covered']:.0f}% |"
        )
    t = report["totals"]
    rows.append(
        f"| **total** | {t['num_statements']} | {t['missing_lines']} | {t['num_branches']} "
        f"| {t['num_partial_branches']} | **{t['percent_covered']:.1f}%** |"
    )
    return "\n".join(rows) + "\n"


def mutation(path: str) -> str:
    """Mutants by module and status, and the share killed (timeouts count as detected).

    :param path: The output of ``mutmut results --all true``.
    :raises ValueError: if it lists no mutants (mutmut did not run).
    """
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        name, _, status = line.strip().rpartition(": ")
        if not name:
            continue
        module = name.split(".x")[0]  # mutmut names a mutant module.x_function or module.xǁClassǁmethod
        counts[module][status] += 1
    if not counts:
        raise ValueError(f"{path} lists no mutants: did mutmut run?")
    statuses = ["killed", "timeout", "survived", "no tests", "suspicious", "skipped", "not checked"]
    rows = ["| module | mutants | " + " | ".join(statuses) + " | detected |", "|---" * (len(statuses) + 3) + "|"]
    total: collections.Counter = collections.Counter()
    for module, c in sorted(counts.items()):
        total.update(c)
        rows.append(_row(f"`{module}`", c, statuses))
    rows.append(_row("**total**", total, statuses))
    return "\n".join(rows) + "\n"


def _row(label: str, c: collections.Counter, statuses: list[str]) -> str:
    n = sum(c.values())
    detected = c["killed"] + c["timeout"]
    return f"| {label} | {n} | " + " | ".join(str(c[s]) for s in statuses) + f" | {100 * detected / n:.1f}% |"


if __name__ == "__main__":
    kind, file = sys.argv[1:3]
    sys.stdout.write({"coverage": coverage, "mutation": mutation}[kind](file))
