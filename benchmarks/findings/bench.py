"""How far a user can trust normlog's findings: per-rule precision, recall and delay on
realistic PyTorch runs, healthy and broken (see scenarios.py), three seeds each.

    python benchmarks/findings/bench.py            # record what is not cached, then score
    python benchmarks/findings/bench.py --record   # record every run again
    python benchmarks/findings/bench.py --names-only   # as `normlog report` sees a run: no shapes

It prints one row per rule (findings, true ones, precision; required problems, found ones,
recall; median delay in logged steps from cause to finding) and the number of healthy runs
with any finding; RESULTS.md holds the table for the current rules and how to read it.

Rules: recording uses plain torch (never `normlog.watch`) and is cached per scenario, seed
and version of its function under benchmarks/findings/traces/ (git ignores it), so iterating
on the rules in `normlog.health` takes seconds. A finding is true when a problem its scenario
declares has the same rule, a tensor the problem names (the finding's origin or any member),
and a cause at or before the finding's step; everything a healthy run finds is false.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from normlog.health import RULES, Finding, StepValues, evaluate  # noqa: E402

TRACES = os.path.join(HERE, "traces")


def _version(name: str) -> str:
    """Of the scenario's own function and the shared loop: after changing a data generator
    or a model class, run with --record."""
    import inspect

    import scenarios

    run = {s.name: s.run for s in scenarios.SCENARIOS}[name]
    source = "".join(inspect.getsource(f) for f in (run, scenarios.Recorder, scenarios.train))
    return hashlib.sha1(source.encode()).hexdigest()[:10]


def _path(name: str, seed: int) -> str:
    return os.path.join(TRACES, f"{name}-{seed}-{_version(name)}.npz")


def record(name: str, seed: int) -> tuple[str, int, float]:
    """Runs one scenario and saves its trace; returns its wall time."""
    import scenarios
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # the same numbers on every machine and in parallel runs
    (scenario,) = [s for s in scenarios.SCENARIOS if s.name == name]
    start = time.perf_counter()
    trace = scenario.run(seed)
    seconds = time.perf_counter() - start
    os.makedirs(TRACES, exist_ok=True)
    np.savez_compressed(
        _path(name, seed),
        names=np.array(trace.names),
        ndims=np.array(trace.ndims),
        owned=np.array(trace.owned),
        grad_norm=trace.grad_norm,
        has_grad=trace.has_grad,
        weight_norm=trace.weight_norm,
        update_ratio=trace.update_ratio,
        grad_nonfinite=trace.grad_nonfinite,
        weight_nonfinite=trace.weight_nonfinite,
        global_norm=trace.global_norm,
        seconds=seconds,
    )
    return name, seed, seconds


def steps(name: str, seed: int, names_only: bool = False) -> list[StepValues]:
    """The trace as the StepValues an adapter gives the Monitor; `names_only` as `normlog
    report` reads them back from the event files: no shapes, and update ratios only of the
    tensors the optimizer owns (the adapters write no others), which report takes as owned."""
    with np.load(_path(name, seed)) as npz:
        return values_of({key: npz[key].tolist() for key in npz.files}, names_only)


def values_of(trace: dict[str, Any], names_only: bool = False) -> list[StepValues]:
    """A trace's fields (`scenarios.Trace`'s, as nested lists) as StepValues, per step."""
    names = [str(n) for n in trace["names"]]
    owned = {n for n, o in zip(names, trace["owned"]) if o}
    ndims = dict(zip(names, (int(d) for d in trace["ndims"])))
    out = []
    for s, has_grad in enumerate(trace["has_grad"]):
        values = StepValues(s, global_norm=trace["global_norm"][s])
        grads, weights = trace["grad_norm"][s], trace["weight_norm"][s]
        bad_grads, bad_weights = trace["grad_nonfinite"][s], trace["weight_nonfinite"][s]
        for i, n in enumerate(names):
            if has_grad[i]:
                values.grad_norms[n] = grads[i]
                if bad_grads[i]:
                    values.grad_nonfinite[n] = bad_grads[i]
            values.weight_norms[n] = weights[i]
            if bad_weights[i]:
                values.weight_nonfinite[n] = bad_weights[i]
            if not names_only or n in owned:
                values.update_ratios[n] = trace["update_ratio"][s][i]
        if names_only:
            values.owned = set(values.update_ratios)  # as normlog.report sets it
        else:
            values.owned = owned
            values.ndims = ndims
        out.append(values)
    return out


def fresh(name: str, seed: int = 0) -> tuple[Score, list[StepValues], list[Finding]]:
    """Records one run now, without the cache (for tests): its score, steps and findings."""
    import scenarios
    import torch

    (scenario,) = [s for s in scenarios.SCENARIOS if s.name == name]
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `record` does
    try:
        trace = scenario.run(seed)
    finally:
        torch.set_num_threads(threads)
    fields = {f.name: getattr(trace, f.name) for f in dataclasses.fields(trace)}
    values = values_of({key: getattr(v, "tolist", lambda v=v: v)() for key, v in fields.items()})
    findings = evaluate(values)
    return score(scenario, seed, findings), values, findings


def seconds(name: str, seed: int) -> float:
    with np.load(_path(name, seed)) as trace:
        return float(trace["seconds"])


@dataclass
class Score:
    """One run's findings against its scenario's problems."""

    scenario: str
    seed: int
    healthy: bool
    findings: list[tuple[Finding, bool]]  # and whether each is true
    found: list[tuple[str, int | None]]  # per required problem: its rule and delay (None: missed)


def _tensors(finding: Finding) -> list[str]:
    return [finding.tensor] + [member.tensor for member in getattr(finding, "members", ())]


def score(scenario: object, seed: int, findings: list[Finding]) -> Score:
    problems = scenario.problems  # type: ignore[attr-defined]

    def matches(problem: object, finding: Finding) -> bool:
        if finding.rule != problem.rule or finding.step < problem.step:  # type: ignore[attr-defined]
            return False
        patterns = problem.tensors or ("*",)  # type: ignore[attr-defined]
        return any(fnmatch.fnmatch(t, p) for t in _tensors(finding) for p in patterns)

    judged = [(f, any(matches(p, f) for p in problems)) for f in findings]
    found = []
    for problem in problems:
        if problem.required:
            delays = [f.step - problem.step for f in findings if matches(problem, f)]
            found.append((problem.rule, min(delays) if delays else None))
    return Score(scenario.name, seed, not problems, judged, found)  # type: ignore[attr-defined]


def table(scores: Iterable[Score]) -> str:
    scores = list(scores)
    lines = [
        "| rule | findings | true | precision | problems | found | recall | median delay |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rule in RULES:
        judged = [ok for s in scores for f, ok in s.findings if f.rule == rule]
        found = [delay for s in scores for r, delay in s.found if r == rule]
        delays = [d for d in found if d is not None]
        precision = f"{sum(judged) / len(judged):.2f}" if judged else "-"
        recall = f"{len(delays) / len(found):.2f}" if found else "-"
        median = f"{statistics.median(delays):g}" if delays else "-"
        counts = f"{len(judged)} | {sum(judged)} | {precision} | {len(found)} | {len(delays)} | {recall}"
        lines.append(f"| {rule} | {counts} | {median} |")
    healthy = [s for s in scores if s.healthy]
    noisy = [s for s in healthy if s.findings]
    lines.append("")
    lines.append(f"Healthy runs with a finding: {len(noisy)} of {len(healthy)}.")
    broken = [s for s in scores if not s.healthy]
    missed = [(s.scenario, s.seed, rule) for s in broken for rule, delay in s.found if delay is None]
    lines.append(
        f"Broken runs: {len(broken)}; injected problems missed: {len(missed)} of {sum(len(s.found) for s in broken)}."
    )
    return "\n".join(lines)


def details(scores: Iterable[Score]) -> str:
    """Every false finding and every miss, for working on the rules."""
    lines = []
    for s in scores:
        for f, ok in s.findings:
            if not ok:
                lines.append(f"FALSE {s.scenario}[{s.seed}] {f.rule} {f.tensor} step {f.step}: {f.message}")
        for rule, delay in s.found:
            if delay is None:
                lines.append(f"MISSED {s.scenario}[{s.seed}] {rule}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import scenarios

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="record every run again")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--names-only", action="store_true", help="as normlog report reads a run: without shapes")
    parser.add_argument("--details", action="store_true", help="list every false finding and miss")
    args = parser.parse_args(argv)
    chosen = [s for s in scenarios.SCENARIOS if not args.only or s.name in args.only]
    runs = [(s.name, seed) for s in chosen for seed in scenarios.SEEDS]
    todo = [run for run in runs if args.record or not os.path.exists(_path(*run))]
    if todo:
        with ProcessPoolExecutor(args.jobs) as pool:
            for name, seed, took in pool.map(record, *zip(*todo)):
                print(f"recorded {name}[{seed}] in {took:.1f} s", file=sys.stderr)
    scores = []
    for scenario in chosen:
        for seed in scenarios.SEEDS:
            scores.append(score(scenario, seed, evaluate(steps(scenario.name, seed, args.names_only))))
    times = [seconds(*run) for run in runs]
    print(
        f"{len(chosen)} scenarios ({sum(s.healthy for s in chosen)} healthy), {len(scenarios.SEEDS)} seeds, "
        f"{scenarios.STEPS} logged steps each; a run records in {statistics.median(times):.1f} s "
        f"(median; max {max(times):.1f} s) on one CPU thread\n"
    )
    print(table(scores))
    if args.details:
        print("\n" + details(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
