"""The benchmark's results: rows with their targets, printed as a table, saved as JSON and a PNG.

A ``Row`` is one measure: the median time of each way (direct to Orthanc, through the portal),
and what its target judges: the ratio direct/portal (1.0 means the portal costs nothing), the time
the portal adds, a size in MB, or a count of errors. The table is Markdown, so that README.md can
show it as printed. The plot is drawn with Pillow (already a test requirement): the ratios against
their targets, and how search times grow with the archive.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# The CPU columns of the second table, in the order the stack's processes are started.
CPU_ROLES = ("orthanc", "control", "catalog", "caddy", "client")


@dataclass(frozen=True)
class Target:
    """What a row must show: ``kind`` is ``ratio`` (direct/portal at least ``limit``), ``extra``
    (the portal adds at most ``limit`` seconds), ``within`` (the portal takes at most ``limit``
    seconds), ``most`` (a value at most ``limit``) or ``errors`` (no errors at all)."""

    kind: str
    limit: float = 0.0

    @property
    def text(self) -> str:
        if self.kind == "ratio":
            return f">= {self.limit:.2f}"
        if self.kind == "extra":
            return f"+{format_seconds(self.limit)} at most"
        if self.kind == "within":
            return f"<= {format_seconds(self.limit)}"
        if self.kind == "most":
            return f"<= {self.limit:g} MB"
        return "no errors"

    def judge(self, value: float) -> bool:
        if self.kind == "ratio":
            return value >= self.limit
        if self.kind in ("extra", "within", "most"):
            return value <= self.limit
        return value == 0


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    name: str
    direct: float | None = None  # seconds (median), or None when there is no direct way
    portal: float | None = None
    value: float | None = None  # what the target judges (see Target.kind)
    target: Target | None = None
    runs: int = 0
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # way -> role -> seconds per run
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.direct is None or not self.portal:
            return None
        return self.direct / self.portal

    def met(self, judged: bool) -> bool | None:
        if not judged or self.target is None or self.value is None:
            return None
        return self.target.judge(self.value)


@dataclass
class Check:
    """One content check: the portal's answer against Orthanc's, or an upload against its files."""

    scenario: str
    what: str
    passed: bool
    detail: str = ""


@dataclass
class Report:
    """Everything one benchmark run found."""

    started: str
    options: dict[str, Any]
    machine: dict[str, Any]
    judged: bool = True  # False for the smoke run: tiny data says nothing about targets
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    archive: dict[str, Any] = field(default_factory=dict)
    scenarios: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def check(self, scenario: str, what: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(scenario, what, passed, detail))
        return passed

    def as_json(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["target"] = row.target.text if row.target else None
            item["target_kind"] = row.target.kind if row.target else None
            item["target_limit"] = row.target.limit if row.target else None
            item["ratio"] = row.ratio
            item["met"] = row.met(self.judged)
            rows.append(item)
        return {
            "format": "pacs-bench/1",
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "judged": self.judged,
            "options": self.options,
            "machine": self.machine,
            "archive": self.archive,
            "scenarios": self.scenarios,
            "rows": rows,
            "checks": [asdict(check) for check in self.checks],
            "all_checks_passed": all(check.passed for check in self.checks),
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, ensure_ascii=False) + "\n")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if abs(seconds) < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _cell(row: Row, way: str) -> str:
    value = row.direct if way == "direct" else row.portal
    if row.target is not None and row.target.kind == "most":
        return "—" if value is None else f"{value:.1f} MB"
    return format_seconds(value)


def _met_text(row: Row, judged: bool) -> str:
    met = row.met(judged)
    if row.target is None or row.value is None:
        return "—"
    if row.target.kind == "extra":
        shown = f"+{format_seconds(row.value)}" if row.value >= 0 else f"-{format_seconds(-row.value)}"
    elif row.target.kind == "ratio":
        shown = f"{row.value:.2f}"
    elif row.target.kind == "within":
        shown = format_seconds(row.value)
    elif row.target.kind == "most":
        shown = f"{row.value:.1f} MB"
    else:
        shown = f"{row.value:g} errors"
    if met is None:
        return f"({shown})"
    return f"{'yes' if met else '**no**'} ({shown})"


def table(report: Report) -> str:
    """The results as a Markdown table."""
    lines = [
        "| scenario | measure | direct | portal | direct/portal | target | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in report.rows:
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "—"
        target = row.target.text if row.target else "—"
        lines.append(
            f"| {row.scenario} | {row.name} | {_cell(row, 'direct')} | {_cell(row, 'portal')} | {ratio} "
            f"| {target} | {_met_text(row, report.judged)} |"
        )
    return "\n".join(lines)


def cpu_table(report: Report) -> str:
    """CPU seconds per run (medians) of each process, for the rows that compare two ways."""
    lines = [
        "| measure | way | " + " | ".join(CPU_ROLES) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in CPU_ROLES) + " |",
    ]
    for row in report.rows:
        for way, used in row.cpu.items():
            cells = " | ".join(f"{used.get(role, 0.0):.2f}" for role in CPU_ROLES)
            lines.append(f"| {row.scenario}: {row.name} | {way} | {cells} |")
    return "\n".join(lines)


def checks_text(report: Report) -> str:
    failed = [check for check in report.checks if not check.passed]
    text = f"content checks: {len(report.checks) - len(failed)} of {len(report.checks)} passed"
    for check in failed:
        text += f"\n  FAILED {check.scenario}: {check.what} {check.detail}"
    return text


# ---- the plot --------------------------------------------------------------------------------

WIDTH = 1000
MARGIN = 20
BAR_HEIGHT = 22
GREEN, RED, GREY, BLUE, ORANGE, PURPLE = "#2e7d32", "#c62828", "#9e9e9e", "#1565c0", "#ef6c00", "#6a1b9a"
INK, FAINT = "#212121", "#e0e0e0"


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def plot(report: Report, path: Path) -> None:
    """A PNG: each ratio against its target, then search times against the archive's size."""
    bars = [row for row in report.rows if row.ratio is not None and row.scenario not in ("growth", "catalog")]
    growth = [row for row in report.rows if row.scenario == "growth" and row.direct and row.portal]
    catalog = catalog_curves(report)
    growth_height = 350 if growth else 0
    catalog_height = 350 if catalog else 0
    height = 70 + len(bars) * (BAR_HEIGHT + 8) + 50 + growth_height + catalog_height
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    title = f"PACS portal benchmark {report.started[:10]}: direct time / portal time (1.0 = no overhead)"
    draw.text((MARGIN, 12), title, fill=INK, font=_font(17))
    note = "medians of interleaved runs on a shared 2-core machine; tick = target"
    draw.text((MARGIN, 36), note, fill=GREY, font=_font(12))
    _ratio_bars(draw, report, bars, top=64)
    below = 64 + len(bars) * (BAR_HEIGHT + 8) + 40
    if growth:
        _growth_lines(draw, growth, top=below)
    if catalog:
        _growth_lines(
            draw,
            catalog,
            top=below + growth_height,
            title="The study catalog alone: page 1 as its rows grow (log scale)",
            note="thick: PostgreSQL; thin: SQLite (rows written straight into the table); count and page",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def _ratio_bars(draw: ImageDraw.ImageDraw, report: Report, bars: list[Row], top: int) -> None:
    label_width, left = 360, MARGIN + 360
    right = WIDTH - MARGIN - 60
    scale_max = max(1.2, *(min(row.ratio or 0, 3.0) for row in bars)) if bars else 1.2

    def x_of(value: float) -> float:
        return left + (right - left) * min(value, scale_max) / scale_max

    for step in range(0, int(scale_max * 10) + 1, 2):
        x = x_of(step / 10)
        draw.line([(x, top - 4), (x, top + len(bars) * (BAR_HEIGHT + 8))], fill=FAINT)
        draw.text(
            (x - 8, top + len(bars) * (BAR_HEIGHT + 8) + 4), f"{step / 10:.1f}", fill=GREY, font=_font(11)
        )
    draw.line([(x_of(1.0), top - 4), (x_of(1.0), top + len(bars) * (BAR_HEIGHT + 8))], fill=INK)
    for index, row in enumerate(bars):
        y = top + index * (BAR_HEIGHT + 8)
        label = f"{row.scenario}: {row.name}"
        while draw.textlength(label, font=_font(13)) > label_width - 10:
            label = label[:-2] + "…"
        draw.text((MARGIN, y + 4), label, fill=INK, font=_font(13))
        met = row.met(report.judged)
        colour = GREY if met is None else GREEN if met else RED
        draw.rectangle([(left, y), (x_of(row.ratio or 0), y + BAR_HEIGHT)], fill=colour)
        draw.text((x_of(row.ratio or 0) + 6, y + 4), f"{row.ratio:.2f}", fill=INK, font=_font(13))
        if row.target and row.target.kind == "ratio":
            x = x_of(row.target.limit)
            draw.line([(x, y - 3), (x, y + BAR_HEIGHT + 3)], fill=INK, width=3)


GROWTH_TITLE = "Search times as the archive grows (log scale)"
GROWTH_NOTE = "thick: the portal's page; thin: Orthanc's /tools/find behind it (for all studies: a full read)"


def plotted_catalog_measure(measure: str) -> bool:
    """The catalog-alone measures drawn (the others are in the table and the JSON)."""
    return measure in ("one result", "all studies, by name") or measure.endswith(", newest first")


def catalog_curves(report: Report) -> list[Row]:
    """The catalog-alone rows as curves: per measure, SQLite as the thin line and PostgreSQL as
    the thick one, against the number of rows."""
    timed: dict[tuple[str, int], dict[str, float]] = {}
    for row in report.rows:
        if row.scenario == "catalog" and "backend" in row.detail and row.portal:
            measure = row.detail["measure"]
            if plotted_catalog_measure(measure):
                timed.setdefault((measure, row.detail["rows"]), {})[row.detail["backend"]] = row.portal
    return [
        Row(
            "catalog",
            measure,
            ways.get("sqlite"),
            ways.get("postgresql"),
            detail={"studies": rows, "measure": measure},
        )
        for (measure, rows), ways in timed.items()
        if ways.get("sqlite") and ways.get("postgresql")
    ]


def _growth_lines(
    draw: ImageDraw.ImageDraw,
    rows: list[Row],
    top: int,
    title: str = GROWTH_TITLE,
    note: str = GROWTH_NOTE,
) -> None:
    draw.text((MARGIN, top), title, fill=INK, font=_font(15))
    draw.text((MARGIN, top + 20), note, fill=GREY, font=_font(12))
    top += 44
    bottom, left, right = top + 240, MARGIN + 70, WIDTH - MARGIN - 230
    sizes = sorted({row.detail["studies"] for row in rows})
    measures = list(dict.fromkeys(row.detail["measure"] for row in rows))
    values = [value for row in rows for value in (row.direct, row.portal) if value]
    low = 10 ** math.floor(math.log10(min(values) * 1000))
    high = 10 ** math.ceil(math.log10(max(values) * 1000))

    def y_of(seconds: float) -> float:
        span = math.log10(high) - math.log10(low)
        return bottom - (bottom - top) * (math.log10(seconds * 1000) - math.log10(low)) / span

    def x_of(size: int) -> float:
        if len(sizes) == 1:
            return (left + right) / 2
        return left + (right - left) * sizes.index(size) / (len(sizes) - 1)

    decade = low
    while decade <= high:
        draw.line([(left, y_of(decade / 1000)), (right, y_of(decade / 1000))], fill=FAINT)
        draw.text((MARGIN, y_of(decade / 1000) - 7), f"{decade:g} ms", fill=GREY, font=_font(11))
        decade *= 10
    for size in sizes:
        draw.text((x_of(size) - 25, bottom + 6), f"{size:,} studies", fill=GREY, font=_font(11))
    colours = [BLUE, ORANGE, GREEN, RED, PURPLE]
    for index, measure in enumerate(measures):
        colour = colours[index % len(colours)]
        for way, width in (("direct", 1), ("portal", 3)):
            points = [
                (x_of(row.detail["studies"]), y_of(getattr(row, way)))
                for row in rows
                if row.detail["measure"] == measure
            ]
            if len(points) > 1:
                draw.line(points, fill=colour, width=width)
            for x, y in points:
                draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=colour)
        legend_y = top + index * 24
        draw.line([(right + 20, legend_y + 8), (right + 50, legend_y + 8)], fill=colour, width=3)
        draw.text((right + 56, legend_y), measure, fill=INK, font=_font(12))
