"""Run a pytest selection N times under load and summarise what failed: the check that a test does not flake.

    python tests/under_load.py --runs 10 --busy 2 -- -m slow            # beside 2 busy-looping processes
    python tests/under_load.py --runs 5 --cpus 0 -- -m slow             # pytest and all it starts on core 0
    python tests/under_load.py --runs 3 --busy 2 --cpus 0 -- tests/test_faults.py -k kill

Each run is a fresh `python -m pytest` (CI=true, so nothing that CI must run is skipped) with a JUnit report;
the summary lists every failing test with its message and the runs it failed in, and says whether the last
runs passed in a row. It exits 1 if any run failed. The busy processes are plain spin loops (pinned to
--cpus too, when given): a shared CI machine's neighbours, not a benchmark. Ctrl-C or kill(1) stops the series:
the run in progress is interrupted as pytest's own Ctrl-C does (its fixtures stop what they started) and not
counted, the busy loops are stopped, and the runs before it are summarised (exit 130). Not collected by pytest
(its name does not start with test_).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--runs N] [--busy K] [--cpus LIST] [--out DIR] -- PYTEST_ARGS")
    parser.add_argument("--runs", type=int, default=10, help="how many times to run the selection")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes running beside it")
    parser.add_argument("--cpus", default="", help="pin pytest, what it starts and the busy loops to these CPUs "
                                                     "(e.g. 0 or 0,1)")
    parser.add_argument("--out", type=Path, default=None, help="where the JUnit reports and summary.json go")
    if "--" in argv:
        split = argv.index("--")
        ours, pytest_args = argv[:split], argv[split + 1:]
    else:
        ours, pytest_args = argv, []
    args = parser.parse_args(ours)
    if args.runs < 1 or args.busy < 0:
        parser.error("--runs must be >= 1 and --busy >= 0")
    return args, pytest_args


def pinned(cpus: str):
    """A preexec hook that pins the child (and so everything it starts) to `cpus`, or None."""
    if not cpus:
        return None
    chosen = {int(c) for c in cpus.split(",")}
    return lambda: os.sched_setaffinity(0, chosen)


def interruptible(cpus: str):
    """pytest's preexec hook: pinned to `cpus`, and Ctrl-C at its default even where this script was started
    ignoring it (nohup, `&` in a script), so that stop() below can interrupt it."""
    pin = pinned(cpus)

    def hook():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if pin:
            pin()
    return hook


class Stopped(KeyboardInterrupt):
    """kill(1) to this script: pytest has not been told."""


def _stopped(signum, frame):
    raise Stopped


def stop(proc: subprocess.Popen, told: bool, grace: float = 60) -> None:
    """pytest interrupted as by Ctrl-C, so that its fixtures stop the commands they started (ranks in sessions of
    their own, which a kill of pytest would leave running); a terminal's Ctrl-C reached it already (`told`: it goes
    to the whole process group, and a second one could cut the teardown short). Killed if it has not ended after
    `grace` seconds."""
    if not told:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def failures(report: Path) -> dict[str, str]:
    """Test id -> first line of its failure or error, from a JUnit XML report."""
    if not report.exists():
        return {"<no report>": "pytest wrote no report (crashed or was killed)"}
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            text = (bad.get("message") or bad.text or bad.tag).strip() or bad.tag
            found[f"{case.get('classname', '')}::{case.get('name', '')}"] = text.splitlines()[0][:300]
    return found


def one_run(i: int, pytest_args: list[str], out: Path, cpus: str) -> tuple[int, float, dict[str, str]]:
    report = out / f"run-{i:02d}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *pytest_args]
    t0 = time.monotonic()
    with open(out / f"run-{i:02d}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "CI": "true"}, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=interruptible(cpus))
        try:
            code = proc.wait()
        except KeyboardInterrupt as e:
            stop(proc, told=not isinstance(e, Stopped))
            raise
    failed = failures(report)
    if code not in (0, 5) and not failed:
        failed = {"<pytest>": f"exit code {code} with no failing test in the report (see run-{i:02d}.log)"}
    return code, time.monotonic() - t0, failed


def summarise(results: list[tuple[int, float, dict[str, str]]]) -> str:
    by_test: dict[str, list[tuple[int, str]]] = {}
    for i, (_, _, failed) in enumerate(results, 1):
        for name, message in failed.items():
            by_test.setdefault(name, []).append((i, message))
    streak = 0
    for _, _, failed in reversed(results):
        if failed:
            break
        streak += 1
    lines = [f"{len(results)} run(s): {sum(1 for r in results if not r[2])} passed, "
             f"{sum(1 for r in results if r[2])} failed; the last {streak} in a row passed"]
    lines += [f"  run {i}: {'passed' if not f else 'FAILED'} in {s:.0f} s" for i, (_, s, f) in enumerate(results, 1)]
    for name, seen in sorted(by_test.items()):
        lines.append(f"{name}: failed in run(s) {', '.join(str(i) for i, _ in seen)}")
        lines += sorted({f"    {m}" for _, m in seen})
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="under-load-"))
    out.mkdir(parents=True, exist_ok=True)
    busy = [subprocess.Popen([sys.executable, "-c", SPIN], preexec_fn=pinned(args.cpus)) for _ in range(args.busy)]
    results, interrupted = [], False
    try:
        for i in range(1, args.runs + 1):
            results.append(one_run(i, pytest_args, out, args.cpus))
            code, seconds, failed = results[-1]
            print(f"run {i}/{args.runs}: exit {code} in {seconds:.0f} s"
                  + (f", failed: {', '.join(failed)}" if failed else ""), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted in run {len(results) + 1}: it is not counted", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    text = summarise(results)
    (out / "summary.json").write_text(json.dumps(
        {"pytest_args": pytest_args, "busy": args.busy, "cpus": args.cpus,
         "runs": [{"exit": c, "seconds": round(s, 1), "failed": f} for c, s, f in results]}, indent=1))
    print(f"{text}\nreports and logs: {out}")
    return 130 if interrupted else 1 if any(f for _, _, f in results) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stopped)  # kill(1) stops the series as Ctrl-C does, with nothing left running
    sys.exit(main())
