"""`normlog report` and `normlog plot` on what they find on disk: damaged, crafted and hostile
event files, FIFOs, TF2 tensor summaries, markup and control characters in names, non-finite
values, many tags and many runs. Files are framed here from the TFRecord spec with the
`crc32c` package and tensorboardX's protos, not with normlog's writer, and what normlog
reads is compared with TensorBoard's own EventAccumulator where TensorBoard can read it."""

from __future__ import annotations

import json
import math
import os
import select
import struct
import subprocess
import sys

import crc32c
import pytest

import normlog
from helpers import event_files, read_events, requires
from normlog import _step
from normlog import report as report_module
from normlog._eventfile import check_event_file
from normlog._eventreader import read_scalars
from normlog.report import EXIT_FOUND, EXIT_NOTHING_READ, PLOT_TAG, load_runs, main

SRC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
GRAD = _step.norm_tag("gradients", "layer")
WEIGHT = _step.norm_tag("parameters", "layer")


def normlog_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m normlog ARGS` in a fresh interpreter (a hang fails the test at `timeout`)."""
    return subprocess.run(
        [sys.executable, "-m", "normlog", *args],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def strict_json(text: str) -> object:
    """json.loads that refuses NaN, Infinity and -Infinity, as RFC 8259 parsers do."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# -- files framed from the spec -----------------------------------------------------------------


def masked_crc(data: bytes) -> bytes:
    # TFRecord framing (tensorflow/core/lib/io/record_writer.cc): a rotated CRC32C plus a constant
    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + masked_crc(length) + data + masked_crc(data)


def event(step: int = 0, file_version: str = "", scalars: dict[str, float] | None = None, start: bool = False) -> bytes:
    from tensorboardX.proto import event_pb2, summary_pb2

    proto = event_pb2.Event(step=step, wall_time=1.0 + step)
    if file_version:
        proto.file_version = file_version
    if start:
        proto.session_log.status = event_pb2.SessionLog.START
    if scalars is not None:
        proto.summary.CopyFrom(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in scalars.items()])
        )
    return proto.SerializeToString()


def norm_events(steps: range) -> bytes:
    return b"".join(frame(event(step, scalars={GRAD: 1.0 + step, WEIGHT: 2.0})) for step in steps)


def claiming_header(length: int) -> bytes:
    """A record header claiming `length` bytes, whose length checksum is right."""
    prefix = struct.pack("<Q", length)
    return prefix + masked_crc(prefix)


def crafted_file(path, length: int) -> None:
    """168 bytes: a file-version event, a step of norms, and a record claiming `length`."""
    data = frame(event(file_version="brain.Event:2")) + norm_events(range(1)) + claiming_header(length)
    assert len(data) < 168
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data + b"\0" * (168 - len(data)))


def norm_run(logdir, steps: int = 40) -> str:
    with normlog.Writer(logdir) as writer:
        for step in range(steps):
            writer.add_scalar(GRAD, 1.0 + step, step)
            writer.add_scalar(WEIGHT, 2.0, step)
            writer.add_scalar(_step.GLOBAL_NORM, 1.0 + step, step)
    (path,) = event_files(str(logdir))
    return path


def bad_logdir(root) -> None:
    """A good run beside a truncated one, one with a flipped byte, a file that is not an
    event file, an empty one and a foreign (plain tensorboardX) run."""
    norm_run(root / "good")
    path = norm_run(root / "truncated")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3 + 7])
    path = norm_run(root / "crc")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    (root / "foreign").mkdir()
    (root / "foreign" / "events.out.tfevents.1.host").write_bytes(b"not an event file\n" * 20)
    (root / "empty").mkdir()
    (root / "empty" / "events.out.tfevents.2.host").write_bytes(b"")
    with normlog.Writer(root / "other") as writer:  # a valid run without normlog's tags
        writer.add_scalar("loss", 1.0, 0)


def hostile_logdir(root) -> None:
    """A good run beside two 168-byte files claiming 2^40 and 2^60 bytes, a FIFO named like
    an event file, and a run with a record that is not an Event between good ones; a
    directory named like an event file is a (here empty) run of its own, not a bad file."""
    norm_run(root / "good")
    (root / "good" / "events.out.tfevents.1.directory").mkdir()
    crafted_file(root / "tera" / "events.out.tfevents.1.crafted", 2**40)
    crafted_file(root / "exa" / "events.out.tfevents.1.crafted", 2**60)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "events.out.tfevents.1.fifo")
    (root / "undecodable").mkdir()
    (root / "undecodable" / "events.out.tfevents.1.host").write_bytes(
        frame(event(file_version="brain.Event:2"))
        + norm_events(range(5))
        + frame(b"\xff\xff\xff\xff not a protobuf")
        + norm_events(range(5, 10))
    )


# -- damaged and hostile files --------------------------------------------------------------------


def test_report_reads_what_it_can_and_names_each_bad_file(tmp_path) -> None:
    # Guarantee: `normlog report` on truncated, corrupt or foreign event files reports what
    # could be read, names each bad file and what is wrong, without a traceback or a hang.
    bad_logdir(tmp_path)
    process = normlog_cli("report", str(tmp_path), "--json")
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr
    document = strict_json(process.stdout)
    assert isinstance(document, dict)
    assert set(document["runs"]) == {"good", "truncated", "crc"}
    assert document["runs"]["good"]["tensors"]["layer"]["grad_norm"]["last"] == 40
    # the whole records before the damage are read
    assert 20 < document["runs"]["truncated"]["tensors"]["layer"]["grad_norm"]["last"] < 40
    assert 10 < document["runs"]["crc"]["tensors"]["layer"]["grad_norm"]["last"] < 40
    problems = "\n".join(document["problems"])
    assert len(document["problems"]) == 4, problems
    for run, words in (
        ("truncated", "cut-off record"),
        ("crc", "CRC mismatch"),
        ("foreign", "not a TensorBoard event file"),
        ("empty", "is empty"),
    ):
        assert any(p.startswith(f"{run}/events.out.tfevents.") and words in p for p in document["problems"]), problems


def test_what_is_read_before_the_damage_is_what_tensorboard_reads(tmp_path) -> None:
    # TensorBoard's EventAccumulator, on the same damaged runs, is the reference
    bad_logdir(tmp_path)
    runs = {run.name: run for run in load_runs(str(tmp_path))[0]}
    for name in ("good", "truncated", "crc"):
        reference = {e.step: e.value for e in read_events(str(tmp_path / name)).Scalars(GRAD)}
        assert {s.step: s.grad_norms["layer"] for s in runs[name].steps} == reference


def test_plot_on_bad_files_plots_the_readable_runs_and_names_the_rest(tmp_path, capsys) -> None:
    requires("matplotlib")
    bad_logdir(tmp_path / "logs")
    assert main(["plot", str(tmp_path / "logs"), "-o", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "cut-off record" in err and "CRC mismatch" in err and "not a TensorBoard event file" in err


@pytest.mark.parametrize("power", [40, 60])
def test_a_crafted_record_length_is_named_without_reading_it(tmp_path, power) -> None:
    # a 168-byte file whose third record claims 2^40 or 2^60 bytes with a valid checksum
    path = tmp_path / "run" / "events.out.tfevents.1.crafted"
    crafted_file(path, 2**power)
    data = path.read_bytes()
    left = len(data) - data.index(claiming_header(2**power)) - 12
    problem = check_event_file(str(path))
    assert problem is not None and "ends in a cut-off record after 2 whole records" in problem
    assert f"it claims {2**power:,} bytes, {left:,} are left" in problem
    # the whole step before it is read
    (run,) = load_runs(str(tmp_path))[0]
    assert [s.grad_norms["layer"] for s in run.steps] == [1.0]


def test_report_on_hostile_files_names_each_and_still_reports_the_good_run(tmp_path) -> None:
    # Guarantee: crafted record lengths (2^40, 2^60 bytes), a FIFO and an undecodable record
    # cost no memory, no hang and no run: each file is named and the rest is read. A real
    # subprocess, so a blocking open or a MemoryError would fail here (the timeout).
    hostile_logdir(tmp_path)
    process = normlog_cli("report", str(tmp_path), "--json", "--fail-on", "nonfinite", timeout=120)
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr
    document = strict_json(process.stdout)
    assert isinstance(document, dict)
    assert document["runs"]["good"]["tensors"]["layer"]["grad_norm"]["last"] == 40
    assert [document["runs"][run]["tensors"]["layer"]["grad_norm"]["last"] for run in ("tera", "exa")] == [1.0, 1.0]
    # the undecodable record is skipped and named; the records after it are still read
    assert document["runs"]["undecodable"]["tensors"]["layer"]["grad_norm"]["last"] == 10.0
    problems = document["problems"]
    expected = {
        "tera/events.out.tfevents.1.crafted": f"claims {2**40:,} bytes",
        "exa/events.out.tfevents.1.crafted": f"claims {2**60:,} bytes",
        "fifo/events.out.tfevents.1.fifo": "is a FIFO, not a regular file",
        "undecodable/events.out.tfevents.1.host": "has 1 records that are not Events (the first is record 6)",
    }
    assert len(problems) == len(expected), problems
    for path, words in expected.items():
        assert any(p.startswith(path) and words in p for p in problems), (path, problems)


def test_a_fifo_is_never_opened_and_tensorboard_is_never_loaded(tmp_path) -> None:
    # Nothing points TensorBoard's EventAccumulator (which would open the FIFO and block)
    # at a run: report reads with its own reader, and never imports TensorBoard at all.
    hostile_logdir(tmp_path)
    code = (
        "import sys; from normlog.report import load_runs; runs, problems = load_runs(sys.argv[1]); "
        "print(len(runs), any(m.split('.')[0] == 'tensorboard' for m in sys.modules))"
    )
    process = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["4", "False"]


def test_plot_on_hostile_files_plots_the_readable_runs_and_names_the_rest(tmp_path) -> None:
    requires("matplotlib")
    hostile_logdir(tmp_path / "logs")
    process = normlog_cli("plot", str(tmp_path / "logs"), "-o", str(tmp_path / "plot.png"), timeout=300)
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    assert "claims 1,099,511,627,776 bytes" in process.stderr and "is a FIFO" in process.stderr


# -- TensorBoard's reading rules --------------------------------------------------------------------


def test_a_restart_and_steps_going_back_are_purged_as_tensorboard_does(tmp_path) -> None:
    # file version 2: a SessionLog START at step s drops every step >= s logged before it;
    # version 1: a step going back drops that tag's later steps. EventAccumulator is the reference.
    keep_all = lambda tag: True
    version2 = tmp_path / "v2"
    version2.mkdir()
    (version2 / "events.out.tfevents.1.host").write_bytes(
        frame(event(file_version="brain.Event:2"))
        + norm_events(range(10))
        + frame(event(6, start=True))
        + norm_events(range(6, 8))
    )
    version1 = tmp_path / "v1"
    version1.mkdir()
    (version1 / "events.out.tfevents.1.host").write_bytes(
        frame(event(file_version="brain.Event:1"))
        + norm_events(range(10))
        + frame(event(4, scalars={GRAD: -1.0}))  # only this tag is purged
        + norm_events(range(12, 14))
    )
    for run in (version2, version1):
        accumulator = read_events(str(run))
        got = read_scalars(str(run), keep_all).series
        assert set(got) == set(accumulator.Tags()["scalars"]) == {GRAD, WEIGHT}
        for tag in (GRAD, WEIGHT):
            assert got[tag] == [(e.step, pytest.approx(e.value)) for e in accumulator.Scalars(tag)], (run, tag)
    assert [step for step, _ in read_scalars(str(version2), keep_all).series[GRAD]] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_a_writer_restarted_with_purge_step_reads_as_in_tensorboard(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer:
        for step in range(20):
            writer.add_scalar(GRAD, float(step), step)
    with normlog.Writer(tmp_path, purge_step=12) as writer:
        for step in range(12, 15):
            writer.add_scalar(GRAD, 100.0 + step, step)
    reference = [(e.step, e.value) for e in read_events(str(tmp_path)).Scalars(GRAD)]
    assert read_scalars(str(tmp_path), lambda tag: True).series[GRAD] == reference
    assert [step for step, _ in reference] == list(range(15))


# -- --fail-on, exit codes ---------------------------------------------------------------------------


def test_fail_on_exits_3_when_nothing_could_be_read(tmp_path, capsys) -> None:
    # empty logdir; only unreadable files; a valid run without normlog's tags
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    bad_logdir(unreadable)
    for run in ("good", "truncated", "crc"):
        for path in event_files(str(unreadable / run)):
            os.remove(path)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "events.out.tfevents.1.crafted").write_bytes(claiming_header(2**60) + b"\0" * 156)
    os.mkfifo(hostile / "events.out.tfevents.2.fifo")
    for logdir in (empty, unreadable, hostile):
        assert main(["report", str(logdir), "--fail-on", "exploding"]) == EXIT_NOTHING_READ == 3
        assert main(["report", str(logdir)]) == 0  # without --fail-on, nothing fails
        assert "no normlog norms could be read" in capsys.readouterr().err
    assert main(["report", str(empty), "--json", "--fail-on", "exploding"]) == 3
    assert strict_json(capsys.readouterr().out) == {"runs": {}}
    requires("matplotlib")
    assert main(["plot", str(empty), "-o", str(tmp_path / "none.png")]) == 3
    assert not (tmp_path / "none.png").exists()


def test_help_documents_the_exit_codes_and_strict_json() -> None:
    process = normlog_cli("report", "--help")
    assert process.returncode == 0
    text = " ".join(process.stdout.split())
    assert "3 nothing under LOGDIR could be read" in text and "1 --fail-on: a finding of one of its rules" in text
    assert "strict JSON" in text and "is null" in text


# -- TF2 tensor summaries ------------------------------------------------------------------------------


def write_tf2_run(logdir: str, write) -> None:
    tf = requires("tensorflow")
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        write(tf)
    writer.close()


def test_tf2_scalars_with_a_nan_and_a_1000x_spike_give_findings(tmp_path, capsys) -> None:
    # Guarantee: logs written by `tf.summary.scalar` (TF2: tensor summaries, the number in a
    # tensor_proto) are read; a NaN and a 1000x spike in them are found and fail --fail-on.
    # (Two runs, so that neither finding can be folded into the other's episode.)
    from normlog.health import StepValues, evaluate

    runs = {"nan": [1.0] * 40, "spike": [1.0] * 40}
    runs["nan"][10], runs["spike"][30] = math.nan, 1000.0
    for name, grads in runs.items():

        def write(tf, grads=grads) -> None:
            for step, grad in enumerate(grads):
                tf.summary.scalar(GRAD, grad, step=step)
                tf.summary.scalar(WEIGHT, 2.0, step=step)

        write_tf2_run(str(tmp_path / name), write)
    from tensorboard.util import tensor_util

    for name, grads in runs.items():
        # TensorBoard reads these as tensors of its scalars plugin, not as scalars
        accumulator = read_events(str(tmp_path / name))
        assert accumulator.Tags()["scalars"] == [] and GRAD in accumulator.Tags()["tensors"]
        assert accumulator.SummaryMetadata(GRAD).plugin_data.plugin_name == "scalars"
        reference = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(GRAD)]
        got = read_scalars(str(tmp_path / name), lambda tag: True).series[GRAD]
        assert [(s, v) for s, v in got if math.isfinite(v)] == [(s, v) for s, v in reference if math.isfinite(v)]
        assert [s for s, v in got if math.isnan(v)] == [s for s, v in reference if math.isnan(v)]
        assert [v for _, v in got] == pytest.approx(grads, nan_ok=True)

    assert main(["report", str(tmp_path), "--json", "--fail-on", "exploding"]) == EXIT_FOUND
    document = strict_json(capsys.readouterr().out)
    assert isinstance(document, dict)
    for name, grads in runs.items():
        # the rules on the numbers the test wrote are the reference
        steps = [StepValues(i, grad_norms={"layer": g}, weight_norms={"layer": 2.0}) for i, g in enumerate(grads)]
        expected = {(f.rule, f.tensor, f.step) for f in evaluate(steps)}
        assert {(f["rule"], f["tensor"], f["step"]) for f in document["runs"][name]["findings"]} == expected
    assert ("nonfinite", "layer", 10) in {
        (f["rule"], f["tensor"], f["step"]) for f in document["runs"]["nan"]["findings"]
    }
    assert ("exploding", "layer", 30) in {
        (f["rule"], f["tensor"], f["step"]) for f in document["runs"]["spike"]["findings"]
    }
    assert main(["report", str(tmp_path / "nan"), "--fail-on", "nonfinite"]) == EXIT_FOUND


def test_tf2_summaries_that_are_not_numbers_are_named_and_fail_on_exits_3(tmp_path, capsys) -> None:
    def write(tf) -> None:
        for step in range(3):
            tf.summary.text(GRAD, "not a number", step=step)
            tf.summary.histogram(WEIGHT, [1.0, 2.0, 3.0], step=step)

    write_tf2_run(str(tmp_path / "tf2"), write)
    assert main(["report", str(tmp_path), "--json", "--fail-on", "exploding"]) == EXIT_NOTHING_READ
    problems = "\n".join(strict_json(capsys.readouterr().out)["problems"])  # type: ignore[index]
    assert f"tf2: {GRAD} holds tensor summaries of TensorBoard's 'text' plugin" in problems
    assert f"tf2: {WEIGHT} holds tensor summaries of TensorBoard's 'histograms' plugin" in problems


# -- what is printed ----------------------------------------------------------------------------------


def test_json_is_strict_with_null_for_nan_and_inf(tmp_path) -> None:
    with normlog.Writer(tmp_path / "run") as writer:
        for step, (grad, weight) in enumerate([(1.0, 2.0), (math.inf, 2.0), (1.0, 2.0), (1.0, math.nan)]):
            writer.add_scalar(GRAD, grad, step)
            writer.add_scalar(WEIGHT, weight, step)
        writer.add_scalar(_step.norm_tag("gradients", "last"), math.nan, 0)
    process = normlog_cli("report", str(tmp_path), "--json")
    assert process.returncode == 0, process.stderr
    document = strict_json(process.stdout)
    assert isinstance(document, dict)
    tensors = document["runs"]["run"]["tensors"]
    assert tensors["layer"]["weight_norm"] is None  # NaN
    assert tensors["layer"]["grad_norm"] == {"last": 1.0, "median": 1.0, "max": 1.0}
    assert tensors["last"]["grad_norm"] == {"last": None, "median": None, "max": None}
    assert ("nonfinite", "last") in {(f["rule"], f["tensor"]) for f in document["runs"]["run"]["findings"]}


def on_a_terminal(*args: str) -> tuple[int, str]:
    """`python -m normlog ARGS` with its output on a pseudo-terminal, as a user sees it."""
    import pty

    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "normlog", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "240", "TERM": "xterm-256color"},
    )
    os.close(slave)
    chunks = []
    while True:
        if not select.select([master], [], [], 120)[0]:
            process.kill()
            raise AssertionError(f"no output in 120 s: {b''.join(chunks)!r}")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def names_logdir(root) -> None:
    """Run and tag names that are rich markup, or terminal escapes."""
    run = root / "a[" / "b]"  # the run is named "a[/b]"
    run.mkdir(parents=True)
    names = ["x[/bold]", "[red]y", "z\x1b[31m\rw"]
    scalars = {_step.norm_tag("gradients", name): 1.0 for name in names}
    records = [frame(event(step, scalars=scalars)) for step in range(3)]
    (run / "events.out.tfevents.1.host").write_bytes(frame(event(file_version="brain.Event:2")) + b"".join(records))


def test_markup_in_names_does_not_crash_the_terminal_table(tmp_path) -> None:
    requires("rich")
    names_logdir(tmp_path)
    code, output = on_a_terminal("report", str(tmp_path))
    assert code == 0 and "MarkupError" not in output and "Traceback" not in output, output
    assert "a[/b]" in output and "x[/bold]" in output and "[red]y" in output
    assert "z\\x1b[31m\\rw" in output and "\x1b[31m\rw" not in output


def test_control_characters_in_names_are_escaped_off_a_terminal(tmp_path) -> None:
    names_logdir(tmp_path)
    process = normlog_cli("report", str(tmp_path))
    assert process.returncode == 0, process.stderr
    assert "\x1b" not in process.stdout and "\r" not in process.stdout
    assert "z\\x1b[31m\\rw" in process.stdout and "x[/bold]" in process.stdout and "run a[/b]:" in process.stdout


# -- many tags, many runs ------------------------------------------------------------------------------


def test_each_tag_is_parsed_once_however_many_steps(tmp_path, monkeypatch) -> None:
    # Tag matching is linear: one parse per distinct tag, then dictionary look-ups.
    names = [f"layer{i}" for i in range(200)]
    with normlog.Writer(tmp_path / "run") as writer:
        for step in range(30):
            scalars = [(_step.norm_tag("gradients", n), 1.0) for n in names]
            writer.add_record(step, [*scalars, ("loss", 0.5)])
    calls: list[str] = []
    parse = report_module.parse_tag
    monkeypatch.setattr(report_module, "parse_tag", lambda tag: calls.append(tag) or parse(tag))
    (run,) = load_runs(str(tmp_path))[0]
    assert sorted(calls) == sorted([_step.norm_tag("gradients", n) for n in names] + ["loss"])
    assert run.tensors == names and len(run.steps) == 30


def png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", open(path, "rb").read()[16:24])  # the IHDR chunk
    return width, height


def test_plot_pages_many_runs_into_images_of_a_bounded_size(tmp_path) -> None:
    # Guarantee: many runs give several images of at most --runs-per-image panels each,
    # never one image growing with the number of runs.
    requires("matplotlib")
    for index in range(7):
        with normlog.Writer(tmp_path / "logs" / f"run{index:02d}") as writer:
            for step in range(5):
                writer.add_scalar(_step.norm_tag("gradients", "a"), 1.0 + index, step)
                writer.add_scalar(_step.norm_tag("gradients", "b"), 2.0, step)
    output = tmp_path / "plot.png"
    process = normlog_cli(
        "plot", str(tmp_path / "logs"), "-o", str(output), "--runs-per-image", "3", "--tensorboard", timeout=300
    )
    assert process.returncode == 0, process.stderr
    pages = [output, tmp_path / "plot-2.png", tmp_path / "plot-3.png"]
    assert sorted(tmp_path.glob("plot*.png")) == sorted(pages)
    assert "7 runs on 3 images of at most 3" in process.stdout
    assert "runs run00 .. run02" in process.stdout and "runs run06 .. run06" in process.stdout
    heights = [png_size(page)[1] for page in pages]
    assert heights[0] == heights[1] > heights[2]  # 3, 3 and 1 runs
    accumulator = read_events(str(tmp_path / "logs" / "normlog_plot"))
    assert sorted(accumulator.Tags()["images"]) == [PLOT_TAG, f"{PLOT_TAG}/page_2", f"{PLOT_TAG}/page_3"]


def test_plot_writes_at_most_max_images_and_says_how_many_runs_it_left_out(tmp_path, capsys) -> None:
    requires("matplotlib")
    for index in range(5):
        norm_run(tmp_path / "logs" / f"run{index}", steps=3)
    output = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path / "logs"), "-o", str(output), "--runs-per-image", "2", "--max-images", "2"]) == 0
    assert sorted(tmp_path.glob("plot*.png")) == [tmp_path / "plot-2.png", output]
    assert "1 more runs were not drawn (--max-images 2)" in capsys.readouterr().err
    # --runs chooses which runs are read at all
    assert main(["plot", str(tmp_path / "logs"), "-o", str(output), "--runs", "run[34]"]) == 0
    assert "(runs run3 .. run4)" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "logs"), "-o", str(output), "--runs", "nothing*"]) == EXIT_NOTHING_READ


def test_report_reads_only_the_runs_chosen_with_runs(tmp_path, capsys) -> None:
    for name in ("lr0.1/seed0", "lr0.1/seed1", "lr1/seed0"):
        norm_run(tmp_path / name, steps=3)
    assert main(["report", str(tmp_path), "--json", "--runs", "lr0.1/*"]) == 0
    assert set(strict_json(capsys.readouterr().out)["runs"]) == {"lr0.1/seed0", "lr0.1/seed1"}  # type: ignore[index]


@pytest.mark.parametrize("option", ["--runs-per-image", "--max-images"])
def test_plot_page_options_must_be_positive(tmp_path, option) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png"), option, "0"])
    assert exit_info.value.code == 2
