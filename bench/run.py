"""``./pacs bench``: start a stack of its own, make the material, run the scenarios, report.

The stack runs on a temporary data directory (or ``--data DIR``, kept afterwards), on free ports,
on 127.0.0.1 only. The results go to a JSON file and a PNG in the installation's data directory
(``data/bench/`` by default, or ``--json`` and ``--plot``), and the table is printed. The exit
code is 0 when every scenario ran and every content check passed, whatever the timings: a missed
target is a finding to report, not a failure of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import report as reporting
from bench.scenarios import PRESETS, SCENARIOS, Bench, describe_archive
from bench.stack import ADMIN_PASSWORD, Stack, StackFailed
from control.site import REPOSITORY, default_data_dir

MARKER = "pacs-bench"  # a data directory the benchmark made, and may use again


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pacs bench",
        description="Benchmark the portal against Orthanc directly, side by side, on a stack of its own.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a few minutes)")
    size.add_argument(
        "--smoke", action="store_true", help="tiny data, one repetition, no targets (what the tests run)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--repeat", type=int, help="interleaved runs of each way (default 5; quick 3)")
    parser.add_argument(
        "--sizes",
        help="archive sizes of the growth scenario, in studies (default 1000,10000; "
        "the full curve: 1000,10000,50000)",
    )
    parser.add_argument(
        "--catalog-rows",
        help="sizes of the catalog alone in the catalog scenario, in rows (default 200000,1000000)",
    )
    parser.add_argument("--users", type=int, help="simulated users (default 50)")
    parser.add_argument("--users-seconds", type=float, help="how long the users keep going (default 60)")
    parser.add_argument(
        "--data", type=Path, help="the stack's data directory, kept afterwards for inspection"
    )
    parser.add_argument(
        "--json", type=Path, help="where the results go (default: bench/bench.json in ./data or PACS_DATA)"
    )
    parser.add_argument(
        "--plot", type=Path, help="where the plot goes (default: bench/bench.png in ./data or PACS_DATA)"
    )
    options = parser.parse_args(argv)
    unknown = set(options.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"no scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    if options.repeat is not None and not 1 <= options.repeat <= 100:
        parser.error("--repeat takes 1 to 100")
    return options


def scale_of(options: argparse.Namespace):
    preset = "smoke" if options.smoke else "quick" if options.quick else "default"
    scale = PRESETS[preset]
    changes = {}
    if options.repeat:
        changes["repeat"] = options.repeat
    if options.sizes:
        changes["sizes"] = tuple(sorted(int(size.replace("_", "")) for size in options.sizes.split(",")))
    if options.catalog_rows:
        changes["catalog_rows"] = tuple(
            sorted(int(size.replace("_", "")) for size in options.catalog_rows.split(","))
        )
    if options.users:
        changes["users"] = options.users
    if options.users_seconds:
        changes["users_seconds"] = options.users_seconds
    return preset, dataclasses.replace(scale, **changes)


def stack_directory(options: argparse.Namespace) -> tuple[Path, bool]:
    """The stack's data directory and whether to keep it; refuse one that is not the benchmark's."""
    if options.data is None:
        return Path(tempfile.mkdtemp(prefix="pacs-bench-")), False
    data = options.data.resolve()
    if data.exists() and any(data.iterdir()) and not (data / MARKER).exists():
        sys.exit(f"pacs bench: {data} holds something else; give a new or empty directory")
    return data, True


def machine() -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "system": platform.platform(),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    preset, scale = scale_of(options)
    chosen = [name for name in SCENARIOS if name in options.scenarios.split(",")]
    results = default_data_dir() / "bench"
    json_path = options.json or results / "bench.json"
    plot_path = options.plot or results / "bench.png"
    data, keep = stack_directory(options)
    data.mkdir(parents=True, exist_ok=True)
    (data / MARKER).write_text("made by ./pacs bench\n")
    report = reporting.Report(
        started=dt.datetime.now().isoformat(timespec="seconds"),
        options={"preset": preset, "scale": dataclasses.asdict(scale), "scenarios": chosen},
        machine=machine(),
        judged=preset != "smoke",
        scenarios=chosen,
    )

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.monotonic()
    stack = Stack.on(data, institution="Benchmark Hospital", admin_password=ADMIN_PASSWORD)
    say(f"pacs bench ({preset}): starting a stack in {data}")
    try:
        stack.start()
        bench = Bench(stack, scale, report, data / "bench", say)
        bench.work.mkdir(exist_ok=True)
        for name in chosen:
            say(f"scenario {name} ...")
            begun = time.monotonic()
            try:
                SCENARIOS[name](bench)
            except Exception as error:  # a broken scenario is reported, and the others still run
                traceback.print_exc()
                report.check(name, "the scenario ran to its end", False, f"{type(error).__name__}: {error}")
            else:
                report.check(name, "the scenario ran to its end", True)
            say(f"  done in {time.monotonic() - begun:.0f} s")
        report.archive.update(describe_archive(bench))
        report.machine["load_average_after"] = os.getloadavg()
    except StackFailed as error:
        report.check("stack", "the stack started", False, str(error)[-2000:])
    finally:
        stack.stop()
        report.seconds = time.monotonic() - started
        if keep:
            report.write_json(data / "bench.json")
        else:
            shutil.rmtree(data, ignore_errors=True)
    report.write_json(json_path)
    reporting.plot(report, plot_path)
    say("")
    say(reporting.table(report))
    say("")
    say("CPU seconds per run (medians):")
    say(reporting.cpu_table(report))
    say("")
    say(reporting.checks_text(report))
    say(f"results: {json_path}, plot: {plot_path}" + (f", data kept in {data}" if keep else ""))
    say(f"whole run: {report.seconds / 60:.1f} min on {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})")
    return 0 if all(check.passed for check in report.checks) else 1
