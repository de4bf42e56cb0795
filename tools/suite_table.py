"""The per-file tables of docs/testing.md from pytest's junit reports (the ones ``.ci/run`` writes to ``out/``).

    python tools/suite_table.py --junit default=out/junit-default.xml --junit slow=out/junit-slow.xml \\
        --markdown docs/testing.md

Each ``NAME=REPORT`` rewrites the table between ``<!-- NAME-table -->`` and ``<!-- /NAME-table -->``: one row per
test file with its number of tests and the seconds it took (the sum of pytest's setup, call and teardown durations
of its tests, as the junit report records them), slowest first. The "what it checks" column is prose: it is kept from
the table being replaced, and a file new to the table gets a placeholder that says to write it. The totals line
above each table (``<!-- NAME-total -->...``) is rewritten too. Without ``--markdown`` the tables are printed.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = "(new file: say what it checks)"


@dataclass(frozen=True)
class FileRow:
    file: str
    tests: int
    seconds: float
    failed: int
    skipped: int


def read_junit(path: Path) -> list[FileRow]:
    """One row per test file of a junit report; raises ValueError naming the file if it is not one."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise ValueError(f"{path}: not a readable junit XML report ({e}); run pytest with --junitxml={path}") from e
    cases = root.iter("testcase")
    tests: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    failed: dict[str, int] = defaultdict(int)
    skipped: dict[str, int] = defaultdict(int)
    for case in cases:
        # classname is "tests.test_x" or "tests.test_x.TestClass"; the file is the first module named test_*
        parts = case.get("classname", "").split(".")
        module = next((p for p in parts if p.startswith("test_")), parts[-1] if parts else "?")
        name = f"{module}.py"
        tests[name] += 1
        seconds[name] += float(case.get("time", "0") or 0)
        if case.find("failure") is not None or case.find("error") is not None:
            failed[name] += 1
        if case.find("skipped") is not None:
            skipped[name] += 1
    if not tests:
        raise ValueError(f"{path}: the report holds no test case (did the run collect nothing?)")
    rows = [FileRow(f, tests[f], seconds[f], failed[f], skipped[f]) for f in tests]
    return sorted(rows, key=lambda r: (-r.seconds, r.file))


def _seconds(s: float) -> str:
    return "<1" if s < 1 else f"{s:.0f}"


def _duration(s: float) -> str:
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec} s" if m else f"{sec} s"


def _descriptions(table: str) -> dict[str, str]:
    """The "what it checks" cell of each file row of an existing table."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`test_"):
            out[cells[0].strip("`")] = "|".join(cells[3:]).strip()
    return out


def render(rows: list[FileRow], descriptions: dict[str, str]) -> str:
    lines = ["| file | tests | seconds | what it checks |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.file}` | {r.tests} | {_seconds(r.seconds)} | {descriptions.get(r.file, PLACEHOLDER)} |")
    return "\n".join(lines)


def total_line(rows: list[FileRow]) -> str:
    n, f, s = sum(r.tests for r in rows), sum(r.failed for r in rows), sum(r.skipped for r in rows)
    secs = sum(r.seconds for r in rows)
    return f"{n - f - s} passed, {f} failed, {s} skipped; {_duration(secs)} of test time in {len(rows)} files"


def rewrite(markdown: str, name: str, rows: list[FileRow]) -> str:
    """``markdown`` with the table (and the totals line, if it has one) between ``name``'s markers replaced."""
    pattern = re.compile(rf"(<!-- {re.escape(name)}-table -->\n)(.*?)(<!-- /{re.escape(name)}-table -->)", re.S)
    m = pattern.search(markdown)
    if m is None:
        raise ValueError(
            f"no '<!-- {name}-table -->' ... '<!-- /{name}-table -->' markers in the markdown file: add them "
            "where the table goes"
        )
    table = render(rows, _descriptions(m.group(2)))
    out = markdown[: m.start(2)] + table + "\n" + markdown[m.end(2) :]
    total = re.compile(rf"(<!-- {re.escape(name)}-total -->)[^\n]*")
    return total.sub(lambda t: t.group(1) + total_line(rows), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", action="append", required=True, metavar="NAME=REPORT", help="a table's name and report")
    p.add_argument("--markdown", type=Path, help="rewrite the tables in this file (default: print them)")
    args = p.parse_args(argv)
    try:
        reports = []
        for spec in args.junit:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--junit {spec!r}: expected NAME=REPORT, e.g. default=out/junit-default.xml")
            reports.append((name, read_junit(Path(path))))
        if args.markdown is None:
            for name, rows in reports:
                print(f"## {name}: {total_line(rows)}\n\n{render(rows, {})}\n")
            return 0
        text = args.markdown.read_text()
        for name, rows in reports:
            text = rewrite(text, name, rows)
        args.markdown.write_text(text)
    except ValueError as e:
        print(f"suite_table: {e}", file=sys.stderr)
        return 1
    for name, rows in reports:
        print(f"{name}: {total_line(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
