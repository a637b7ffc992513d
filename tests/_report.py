"""Lines the tests want in pytest's terminal summary (fuzz counts, bad inputs tried):
`record(section, line)`; conftest.py prints them after the run."""

from collections import defaultdict

LINES: dict[str, list[str]] = defaultdict(list)


def record(section: str, line: str) -> None:
    LINES[section].append(line)
