"""`normlog report` and `normlog plot`: what a logdir's norms say, read back with TensorBoard's reader.

Rules: runs are read with TensorBoard's own EventAccumulator and evaluated with the same
`health.Monitor` the adapters run online, so a run logged without online rules (direct Writer
calls, an older normlog) gets the same findings. A run that cannot be read is named and
skipped, never a traceback. matplotlib and rich load only for `plot` and terminal output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from normlog._eventfile import check_event_file
from normlog._step import parse_tag
from normlog.health import RULES, Finding, StepValues, evaluate
from normlog.plot import plot_gradient_norms

__all__ = ["Run", "check_event_file", "load_runs", "main", "plot_gradient_norms"]


@dataclass
class Run:
    name: str
    steps: list[StepValues]
    tensors: list[str]  # in the order the model lists them
    findings: list[Finding]

    def summary(self) -> dict[str, dict[str, Any]]:
        flags: dict[str, set[str]] = {}
        for finding in self.findings:
            flags.setdefault(finding.tensor, set()).add(finding.rule)
        table: dict[str, dict[str, Any]] = {}
        for name in self.tensors:
            grads = [s.grad_norms[name] for s in self.steps if name in s.grad_norms]
            weights = [s.weight_norms[name] for s in self.steps if name in s.weight_norms]
            ratios = [s.update_ratios[name] for s in self.steps if name in s.update_ratios]
            finite = [g for g in grads if math.isfinite(g)]
            table[name] = {
                "grad_norm": {
                    "last": grads[-1] if grads else None,
                    "median": statistics.median(finite) if finite else None,
                    "max": max(finite) if finite else None,
                },
                "weight_norm": weights[-1] if weights else None,
                "update_ratio": ratios[-1] if ratios else None,
                "flags": sorted(flags.get(name, ())),
            }
        return table


def _reader() -> Any:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:
        raise SystemExit("normlog report needs TensorBoard's reader: pip install 'normlog[report]'") from error
    return EventAccumulator


def _run_dirs(logdir: str) -> list[str]:
    found = []
    for directory, _, files in os.walk(logdir):
        if any("tfevents" in name for name in files):
            found.append(directory)
    return sorted(found)


def _load_run(directory: str, name: str) -> Run:
    accumulator = _reader()(directory, size_guidance={"scalars": 0})
    accumulator.Reload()
    per_step: dict[int, StepValues] = {}
    tensors: list[str] = []

    def at(step: int) -> StepValues:
        return per_step.setdefault(step, StepValues(step))

    fields = {
        ("gradients", "norm"): "grad_norms",
        ("parameters", "norm"): "weight_norms",
        ("parameters", "ratio"): "update_ratios",
        ("gradients", "nonfinite"): "grad_nonfinite",
        ("parameters", "nonfinite"): "weight_nonfinite",
    }
    for tag in accumulator.Tags().get("scalars", []):
        parsed = parse_tag(tag)
        if parsed is None:
            continue
        if parsed.statistic == "global_norm":
            for event in accumulator.Scalars(tag):
                at(event.step).global_norm = event.value
            continue
        field_name = fields.get((parsed.kind, parsed.statistic))
        if field_name is None:
            continue
        tensor = parsed.name
        if field_name in ("grad_norms", "weight_norms") and tensor not in tensors:
            tensors.append(tensor)
        for event in accumulator.Scalars(tag):
            getattr(at(event.step), field_name)[tensor] = event.value
    steps = [per_step[s] for s in sorted(per_step)]
    for values in steps:  # the model's order, as the adapters logged them
        values.grad_norms = {t: values.grad_norms[t] for t in tensors if t in values.grad_norms}
        values.weight_norms = {t: values.weight_norms[t] for t in tensors if t in values.weight_norms}
    return Run(name, steps, tensors, evaluate(steps))


def load_runs(logdir: str) -> tuple[list[Run], list[str]]:
    """Every run under `logdir` that holds normlog's norms, and the problems met reading
    them: bad event files are named with what is wrong, and whatever came before the first
    bad record is still read."""
    runs, problems = [], []
    for directory in _run_dirs(logdir):
        name = os.path.relpath(directory, logdir)
        for file_name in sorted(os.listdir(directory)):
            if "tfevents" in file_name:
                problem = check_event_file(os.path.join(directory, file_name))
                if problem:
                    problems.append(f"{os.path.join(name, file_name)} {problem}")
        try:
            run = _load_run(directory, name)
        except Exception as error:  # a bad file must not hide the good runs
            problems.append(f"{name}: could not be read ({error!r})")
            continue
        if run.steps:
            runs.append(run)
    return runs, problems


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _print_text(runs: list[Run], problems: list[str]) -> None:
    use_rich = sys.stdout.isatty()
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    for run in runs:
        header = ["tensor", "grad last", "grad median", "grad max", "weight", "update ratio", "flags"]
        rows = [
            [
                name,
                _format(info["grad_norm"]["last"]),
                _format(info["grad_norm"]["median"]),
                _format(info["grad_norm"]["max"]),
                _format(info["weight_norm"]),
                _format(info["update_ratio"]),
                ", ".join(info["flags"]),
            ]
            for name, info in run.summary().items()
        ]
        title = f"run {run.name}: {len(run.steps)} logged steps, {len(run.findings)} findings"
        if use_rich:
            table = Table(*header, title=title)
            for row in rows:
                table.add_row(*row, style="red" if row[-1] else None)
            Console().print(table)
        else:
            widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
            print(title)
            for row in [header, *rows]:
                print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        for finding in run.findings:
            print(f"  [{finding.rule}] step {finding.step}: {finding.message}")
        print()
    for problem in problems:
        print(problem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlog", description="Read normlog's event files back.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="tables of norms and the findings, per run")
    report.add_argument("logdir")
    report.add_argument("--json", action="store_true", help="print the findings and tables as JSON")
    report.add_argument(
        "--fail-on", default="", metavar="RULE[,RULE]", help=f"exit 1 if one is found: {', '.join(RULES)}"
    )
    plot = commands.add_parser("plot", help="per-tensor gradient-norm curves, one panel per run")
    plot.add_argument("logdir")
    plot.add_argument("-o", "--output", required=True, help="the image file to write (PNG)")
    plot.add_argument("--tensorboard", action="store_true", help="also write the figure into <logdir>/normlog_plot")
    args = parser.parse_args(argv)
    if "tensorflow" not in sys.modules:
        # TensorBoard's own TF-free reader: the same records, without importing TensorFlow
        # (seconds of start-up and its log lines) into a command-line tool.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

    if not os.path.isdir(args.logdir):
        print(f"normlog: no such log directory: {args.logdir}", file=sys.stderr)
        return 2
    runs, problems = load_runs(args.logdir)
    if args.command == "plot":
        if not runs:
            print(f"normlog: no normlog norms under {args.logdir}", file=sys.stderr)
            return 1
        for problem in problems:
            print(problem, file=sys.stderr)
        figure = plot_gradient_norms(runs)
        figure.savefig(args.output, dpi=100)
        if args.tensorboard:
            from normlog.writer import Writer

            with Writer(os.path.join(args.logdir, "normlog_plot")) as writer:
                writer.add_figure("health/gradient_norms", figure, max(s.step for r in runs for s in r.steps))
        print(f"wrote {args.output}")
        return 0

    fail_on = {rule.strip() for rule in args.fail_on.split(",") if rule.strip()}
    if fail_on - set(RULES):
        print(f"normlog: unknown rule(s) {sorted(fail_on - set(RULES))}; rules are {', '.join(RULES)}", file=sys.stderr)
        return 2
    if args.json:
        document = {
            "runs": {
                run.name: {"tensors": run.summary(), "findings": [f.as_dict() for f in run.findings]} for run in runs
            }
        }
        if problems:
            document["problems"] = problems  # type: ignore[assignment]
        print(json.dumps(document, indent=2))
    else:
        _print_text(runs, problems)
    failed = [f for run in runs for f in run.findings if f.rule in fail_on]
    return 1 if failed else 0
