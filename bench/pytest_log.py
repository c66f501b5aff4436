"""Test results that survive a time limit: a pytest plugin that writes one
JSON line per test the moment it ends (a JUnit XML is written only when the
whole run ends, so a killed run leaves none), and the summary made from
those lines, which the GPU suite writes whether its tests part finished or
was cut short::

    python -m pytest -p bench.pytest_log --log-jsonl=run.jsonl ...
    python -m bench.pytest_log run.jsonl --out summary.json [--status "timed out after 480s"]

The option takes the ``=`` form: pytest chooses its root folder from the
command line before this plugin's option is known, and would take a separate
path for a test path.

Lines of the log: ``{"event": "start", "nodeid"}`` as a test starts,
``{"event": "result", "nodeid", "outcome", "duration", "message"}`` as it
ends (outcome: passed, failed, error (its setup or teardown failed),
skipped, xfailed, xpassed), ``{"event": "finish", "exitstatus"}`` when the
session ends. A test with a start and no result is the one the time limit cut.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional


def pytest_addoption(parser):
    parser.addoption("--log-jsonl", metavar="PATH", default=None,
                     help="write each test's outcome to PATH as a JSON line as soon as the test ends")


def pytest_configure(config):
    path = config.getoption("log_jsonl")
    if path:
        config.pluginmanager.register(JsonLinesLog(path), "pgs_jsonl_log")


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])  # (file, line, reason)
    text = getattr(report, "longreprtext", "") or ""
    return text[-2000:]  # the end of a traceback says what failed


class JsonLinesLog:
    """Writes the log; each line is flushed as written, so a killed run
    keeps every line up to the kill."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w")
        self.current: Dict[str, dict] = {}

    def _write(self, doc: dict) -> None:
        self.file.write(json.dumps(doc) + "\n")
        self.file.flush()

    def pytest_runtest_logstart(self, nodeid, location):
        self.current[nodeid] = {"event": "result", "nodeid": nodeid, "outcome": "passed", "duration": 0.0,
                                "message": ""}
        self._write({"event": "start", "nodeid": nodeid, "time": round(time.time(), 3)})

    def pytest_runtest_logreport(self, report):
        doc = self.current[report.nodeid]
        doc["duration"] = round(doc["duration"] + report.duration, 3)
        if doc["outcome"] != "passed":  # the first phase that did not pass decides
            return
        if hasattr(report, "wasxfail"):
            doc["outcome"] = "xpassed" if report.passed else "xfailed"
            doc["message"] = str(report.wasxfail)
        elif report.failed:
            doc["outcome"] = "failed" if report.when == "call" else "error"
            doc["message"] = _message(report)
        elif report.skipped:
            doc["outcome"] = "skipped"
            doc["message"] = _message(report)

    def pytest_runtest_logfinish(self, nodeid, location):
        self._write(self.current.pop(nodeid))

    def pytest_sessionfinish(self, session, exitstatus):
        self._write({"event": "finish", "exitstatus": int(exitstatus)})
        self.file.close()


OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def read_log(path: str) -> List[dict]:
    """The log's lines; a line cut short by a kill is dropped."""
    docs = []
    with open(path) as f:
        for line in f:
            try:
                docs.append(json.loads(line))
            except ValueError:
                pass
    return docs


def summarize(docs: List[dict]) -> dict:
    """Counts, failures, the test that was running when the run ended (if it
    did not end by itself) and the slowest tests."""
    results = {d["nodeid"]: d for d in docs if d.get("event") == "result"}
    started = [d["nodeid"] for d in docs if d.get("event") == "start"]
    finish = next((d for d in docs if d.get("event") == "finish"), None)
    counts = {k: sum(r["outcome"] == k for r in results.values()) for k in OUTCOMES}
    slowest = sorted(results.values(), key=lambda r: -r["duration"])[:15]
    return {
        "complete": finish is not None,
        "exitstatus": finish["exitstatus"] if finish else None,
        "tests": len(results),
        **counts,
        "failed_tests": [{"nodeid": r["nodeid"], "outcome": r["outcome"], "message": r["message"]}
                         for r in results.values() if r["outcome"] in ("failed", "error")],
        "unfinished": [n for n in started if n not in results],
        "seconds": round(sum(r["duration"] for r in results.values()), 1),
        "slowest": [{"nodeid": r["nodeid"], "duration": r["duration"], "outcome": r["outcome"]} for r in slowest],
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="the JSON lines file pytest wrote with --log-jsonl")
    ap.add_argument("--out", required=True, help="summary JSON to write (overwritten)")
    ap.add_argument("--status", default=None, help="how the run ended, as the caller saw it (recorded as is)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.log):
        print(f"pytest_log: {args.log} does not exist: pytest never started (see the output above)",
              file=sys.stderr)
        return 1

    import torch

    from bench.common import git_commit, triton_version, write_result

    doc = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "status": args.status,
        **summarize(read_log(args.log)),
    }
    write_result(args.out, doc, quiet=True)
    print(json.dumps({k: v for k, v in doc.items() if k != "slowest"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
