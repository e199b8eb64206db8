"""`normlog report` and `normlog plot`: what a logdir's norms say, read back from its event files.

Rules: runs are read by `_eventreader` with TensorBoard's reading rules (files in name order,
each up to its first bad record, restarted steps purged) and evaluated with the same
`health.Monitor` the adapters run online, so a run logged without online rules (direct Writer
calls, an older normlog, `tf.summary.scalar`) gets the same findings. Nothing on disk may
crash, hang or exhaust this: each bad file is named and the rest still read. What is printed
is escaped (rich markup, control characters) and `--json` is strict JSON. Work is linear in
tags and records. matplotlib and rich load only for `plot` and terminal output.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from normlog._eventfile import check_event_file
from normlog._eventreader import is_event_file_name, read_scalars
from normlog._step import parse_tag
from normlog.health import RULES, Finding, StepValues, evaluate
from normlog.plot import plot_gradient_norms

__all__ = ["EXIT_FOUND", "EXIT_NOTHING_READ", "EXIT_USAGE", "Run", "check_event_file", "load_runs", "main"]

EXIT_FOUND = 1  # --fail-on: a finding of a named rule
EXIT_USAGE = 2  # a bad argument or a missing log directory (argparse's own code)
EXIT_NOTHING_READ = 3  # --fail-on, or plot: no normlog norms could be read under the logdir
PLOT_TAG = "health/gradient_norms"  # where `plot --tensorboard` writes its first image


@dataclass
class Run:
    name: str
    steps: list[StepValues]
    tensors: list[str]  # in the order the model lists them
    findings: list[Finding]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per tensor: its gradient norm's last, median and max (finite) value, its last weight
        norm and update ratio, and the rules it was flagged by. One pass over the steps."""
        flags: dict[str, set[str]] = {}
        for finding in self.findings:
            flags.setdefault(finding.tensor, set()).add(finding.rule)
        grads: dict[str, list[float]] = {name: [] for name in self.tensors}
        weights: dict[str, float] = {}
        ratios: dict[str, float] = {}
        for values in self.steps:
            for name, norm in values.grad_norms.items():
                grads[name].append(norm)
            weights.update(values.weight_norms)
            ratios.update(values.update_ratios)
        table: dict[str, dict[str, Any]] = {}
        for name in self.tensors:
            finite = [g for g in grads[name] if math.isfinite(g)]
            table[name] = {
                "grad_norm": {
                    "last": grads[name][-1] if grads[name] else None,
                    "median": statistics.median(finite) if finite else None,
                    "max": max(finite) if finite else None,
                },
                "weight_norm": weights.get(name),
                "update_ratio": ratios.get(name),
                "flags": sorted(flags.get(name, ())),
            }
        return table


_FIELDS = {  # (kind, statistic) of a parsed tag -> the StepValues field it fills
    ("gradients", "norm"): "grad_norms",
    ("parameters", "norm"): "weight_norms",
    ("parameters", "ratio"): "update_ratios",
    ("gradients", "nonfinite"): "grad_nonfinite",
    ("parameters", "nonfinite"): "weight_nonfinite",
}
_GLOBAL = "global_norm"


def _run_dirs(logdir: str, problems: list[str]) -> list[str]:
    found = []

    def unreadable(error: OSError) -> None:
        problems.append(f"{os.path.relpath(error.filename or logdir, logdir)}: cannot be listed ({error.strerror})")

    for directory, _, files in os.walk(logdir, onerror=unreadable):
        if any(is_event_file_name(name) for name in files):
            found.append(directory)
    return sorted(found)


def _load_run(directory: str, name: str) -> tuple[Run, list[str]]:
    """One run's steps, from the tags `parse_tag` knows (each tag parsed once), and its problems."""
    targets: dict[str, tuple[str, str]] = {}  # tag -> (StepValues field, tensor)

    def keep(tag: str) -> bool:
        parsed = parse_tag(tag)
        if parsed is None:
            return False
        field_name = _GLOBAL if parsed.statistic == _GLOBAL else _FIELDS.get((parsed.kind, parsed.statistic))
        if field_name is not None:
            targets[tag] = (field_name, parsed.name)
        return field_name is not None

    scalars = read_scalars(directory, keep)
    problems = [f"{os.path.join(name, file)} {what}" if file else f"{name}: {what}" for file, what in scalars.problems]
    problems += [f"{name}: {tag} {why}; it was not read" for tag, why in scalars.unreadable.items()]
    per_step: dict[int, StepValues] = {}

    def at(step: int) -> StepValues:
        values = per_step.get(step)
        if values is None:
            values = per_step[step] = StepValues(step)
        return values

    tensors: dict[str, int] = {}  # in the order the model lists them: first seen, first
    for tag, points in scalars.series.items():
        field_name, tensor = targets[tag]
        if field_name == _GLOBAL:
            for step, value in points:
                at(step).global_norm = value
            continue
        if field_name in ("grad_norms", "weight_norms"):
            tensors.setdefault(tensor, len(tensors))
        for step, value in points:
            getattr(at(step), field_name)[tensor] = value
    steps = [per_step[s] for s in sorted(per_step)]
    for values in steps:  # the model's order, as the adapters logged them
        values.grad_norms = _in_order(values.grad_norms, tensors)
        values.weight_norms = _in_order(values.weight_norms, tensors)
        # The adapters measure update ratios of the tensors an optimizer updates only, so the
        # tensors with a ratio are the ones it owned (`StepValues.owned`), as online. Shapes
        # (`StepValues.ndims`) are not in the event files: 1-D biases and gains are guessed
        # from their names here, where the adapters know them.
        if values.update_ratios:
            values.owned = set(values.update_ratios)
    return Run(name, steps, list(tensors), evaluate(steps)), problems


def _in_order(norms: dict[str, float], order: dict[str, int]) -> dict[str, float]:
    """`norms` in `order`, dropping names not in it; in O(n) when already in order."""
    places = [order.get(name, -1) for name in norms]
    if -1 not in places and places == sorted(places):  # timsort: one pass when sorted
        return norms
    return {name: norms[name] for name in sorted((n for n in norms if n in order), key=order.__getitem__)}


def load_runs(logdir: str, pattern: str | None = None) -> tuple[list[Run], list[str]]:
    """Every run under `logdir` that holds normlog's norms, and the problems met reading
    them: each bad file is named with what is wrong (a cut-off or corrupt record, a file
    that is not an event file or not a regular file, tensor summaries that are not numbers),
    and whatever it held before the damage is still read.

    Args:
        logdir: the directory whose subdirectories holding event files are the runs, named
            by their path relative to it.
        pattern: read only the runs whose name matches this `fnmatch` pattern.

    Returns:
        The runs with normlog's norms, in name order, and the problems, one line each.

    Example:
        >>> runs, problems = load_runs("logs")  # doctest: +SKIP
        >>> [(run.name, len(run.findings)) for run in runs]  # doctest: +SKIP
    """
    runs: list[Run] = []
    problems: list[str] = []
    for directory in _run_dirs(logdir, problems):
        name = os.path.relpath(directory, logdir)
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            continue
        try:
            run, found = _load_run(directory, name)
        except Exception as error:  # never expected; still, one run must not hide the others
            problems.append(f"{name}: could not be read ({error!r})")
            continue
        problems += found
        if run.steps:
            runs.append(run)
    return runs, problems


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _printable(text: str) -> str:
    """`text` with control characters (ANSI escapes, carriage returns, bidi overrides,
    undecodable bytes of a file name) written as Python escapes, so that a tag or a file name
    cannot restyle, move or hide what a terminal shows."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text
    )


def _strict(value: Any) -> Any:
    """`value` with every NaN and ±Inf replaced by None: strict JSON (RFC 8259) has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _print_text(runs: list[Run], problems: list[str]) -> None:
    use_rich = sys.stdout.isatty()
    if use_rich:
        try:
            from rich.console import Console
            from rich.markup import escape
            from rich.table import Table
        except ImportError:
            use_rich = False
    for run in runs:
        header = ["tensor", "grad last", "grad median", "grad max", "weight", "update ratio", "flags"]
        rows = [
            [
                _printable(name),
                _format(info["grad_norm"]["last"]),
                _format(info["grad_norm"]["median"]),
                _format(info["grad_norm"]["max"]),
                _format(info["weight_norm"]),
                _format(info["update_ratio"]),
                ", ".join(info["flags"]),
            ]
            for name, info in run.summary().items()
        ]
        title = _printable(f"run {run.name}: {len(run.steps)} logged steps, {len(run.findings)} findings")
        if use_rich:
            # Tags and run names are the user's text: `[/x]` in one must not be read as markup.
            table = Table(*header, title=escape(title))
            for row in rows:
                table.add_row(*(escape(cell) for cell in row), style="red" if row[-1] else None)
            Console().print(table)
        else:
            widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
            print(title)
            for row in [header, *rows]:
                print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        for finding in run.findings:
            print(_printable(f"  [{finding.rule}] step {finding.step}: {finding.message}"))
        print()
    for problem in problems:
        print(_printable(problem))


_EPILOG = f"""exit status:
  0  done
  {EXIT_FOUND}  --fail-on: a finding of one of its rules
  {EXIT_USAGE}  bad arguments, or no such log directory
  {EXIT_NOTHING_READ}  nothing under LOGDIR could be read as normlog's norms (an empty logdir, only
     unreadable files, only summaries that are not numbers): report with --fail-on, and plot
Files that cannot be read are named with what is wrong (report: after the tables, or under
"problems" with --json; plot: on stderr); what they held before the damage is still read.
--json is strict JSON (RFC 8259): a value that is NaN or +-Inf, or never logged, is null."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlog",
        description="Read normlog's event files back.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="tables of norms and the findings, per run",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logdir")
    report.add_argument("--json", action="store_true", help="print the findings and tables as strict JSON")
    report.add_argument(
        "--fail-on",
        default="",
        metavar="RULE[,RULE]",
        help=f"exit {EXIT_FOUND} if one is found, {EXIT_NOTHING_READ} if nothing could be read: {', '.join(RULES)}",
    )
    plot = commands.add_parser(
        "plot",
        help="per-tensor gradient-norm curves, one panel per run, a page of panels per image",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("logdir")
    plot.add_argument(
        "-o", "--output", required=True, help="the image file to write (PNG); more pages go to FILE-2.png, ..."
    )
    plot.add_argument(
        "--runs-per-image",
        type=int,
        default=12,
        metavar="N",
        help="at most N runs (panels) per image; the next N go to FILE-2.png, and so on (default 12)",
    )
    plot.add_argument(
        "--max-images",
        type=int,
        default=10,
        metavar="K",
        help="write at most K images, and say how many runs were left out (default 10)",
    )
    plot.add_argument("--tensorboard", action="store_true", help="also write the figures into <logdir>/normlog_plot")
    for command in (report, plot):
        command.add_argument(
            "--runs", metavar="GLOB", help="only the runs whose name matches GLOB (fnmatch: 'lr*', '*/seed[0-4]')"
        )
    return parser


def _page_paths(output: str, pages: int) -> list[str]:
    stem, suffix = os.path.splitext(output)
    return [output] + [f"{stem}-{page}{suffix}" for page in range(2, pages + 1)]


def _plot(args: argparse.Namespace, runs: list[Run], problems: list[str]) -> int:
    for problem in problems:
        print(_printable(problem), file=sys.stderr)
    if not runs:
        print(_printable(f"normlog: no normlog norms could be read under {args.logdir}"), file=sys.stderr)
        return EXIT_NOTHING_READ
    per_image = args.runs_per_image
    pages = [runs[start : start + per_image] for start in range(0, len(runs), per_image)]
    left_out = sum(len(page) for page in pages[args.max_images :])
    pages = pages[: args.max_images]
    paths = _page_paths(args.output, len(pages))
    writer = None
    if args.tensorboard:
        from normlog.writer import Writer

        writer = Writer(os.path.join(args.logdir, "normlog_plot"))
    step = max(s.step for r in runs for s in r.steps)
    try:
        for page, (page_runs, path) in enumerate(zip(pages, paths), start=1):
            figure = plot_gradient_norms(page_runs)
            figure.savefig(path, dpi=100)
            if writer is not None:
                # Report's own tag (nothing reads it back): one image per page of runs.
                writer.add_figure(PLOT_TAG if page == 1 else f"{PLOT_TAG}/page_{page}", figure, step)
            pyplot = sys.modules.get("matplotlib.pyplot")
            if pyplot is not None:  # a pyplot figure lives until closed; one page at a time
                pyplot.close(figure)
            print(_printable(f"wrote {path} (runs {page_runs[0].name} .. {page_runs[-1].name})"))
    finally:
        if writer is not None:
            writer.close()
    if len(pages) > 1:
        print(f"{len(runs) - left_out} runs on {len(pages)} images of at most {per_image} (--runs-per-image)")
    if left_out:
        print(
            f"normlog: {left_out} more runs were not drawn (--max-images {args.max_images}): "
            "choose runs with --runs GLOB, or raise --max-images",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`normlog report|plot LOGDIR ...`; returns the exit status (see `--help`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "plot" and min(args.runs_per_image, args.max_images) < 1:
        parser.error("--runs-per-image and --max-images must be at least 1")
    if not os.path.isdir(args.logdir):
        print(_printable(f"normlog: no such log directory: {args.logdir}"), file=sys.stderr)
        return EXIT_USAGE
    fail_on = set()
    if args.command == "report":
        fail_on = {rule.strip() for rule in args.fail_on.split(",") if rule.strip()}
        if fail_on - set(RULES):
            unknown = sorted(fail_on - set(RULES))
            print(f"normlog: unknown rule(s) {unknown}; rules are {', '.join(RULES)}", file=sys.stderr)
            return EXIT_USAGE
    runs, problems = load_runs(args.logdir, args.runs)
    if args.command == "plot":
        return _plot(args, runs, problems)

    if args.json:
        document: dict[str, Any] = {
            "runs": {
                run.name: {"tensors": run.summary(), "findings": [f.as_dict() for f in run.findings]} for run in runs
            }
        }
        if problems:
            document["problems"] = problems
        print(json.dumps(_strict(document), indent=2, allow_nan=False))
    else:
        _print_text(runs, problems)
    if not runs:
        print(_printable(f"normlog: no normlog norms could be read under {args.logdir}"), file=sys.stderr)
        if fail_on:
            return EXIT_NOTHING_READ
    failed = [f for run in runs for f in run.findings if f.rule in fail_on]
    return EXIT_FOUND if failed else 0
