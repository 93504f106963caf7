"""Regenerate tests/durations.json (seconds per test file) from a full run's junit report.

    .venv/bin/python -m pytest -n 2 --dist loadfile tests --junitxml=/tmp/junit.xml
    .venv/bin/python tests/update_durations.py /tmp/junit.xml

conftest.py hands the files out heaviest first by these figures (xdist --dist loadfile), so two
workers finish together; a file missing from the JSON keeps its place after the known ones.
"""
import collections
import json
import pathlib
import sys
import xml.etree.ElementTree as ET

DURATIONS = pathlib.Path(__file__).with_name("durations.json")


def per_file(junit_xml: str) -> dict[str, float]:
    """{"tests/x/test_y.py": seconds}, heaviest first: each test case's time (set-up, call and
    tear-down, so module fixtures count) summed over its file."""
    seconds = collections.Counter()
    for case in ET.parse(junit_xml).iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.moe.test_layer[.TestClass]
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
        seconds["/".join(parts[:module + 1]) + ".py"] += float(case.get("time", 0))
    return {path: round(s, 1) for path, s in seconds.most_common()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} JUNIT_XML")
    DURATIONS.write_text(json.dumps(per_file(sys.argv[1]), indent=1) + "\n")
    print(f"wrote {DURATIONS}")
