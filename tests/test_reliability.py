"""Never losing data, never taking training down: real processes killed, a disk that fills
up, many threads on one Writer, odd inputs. Each test names the promise it proves in the
README's Guarantees section."""

from __future__ import annotations

import importlib
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normlog
from helpers import event_files, read_events, requires, scalars

SRC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")


def start(script: str, logdir: str) -> subprocess.Popen[str]:
    """Run `script` in a fresh interpreter with `logdir` as LOGDIR; it prints READY when its
    events are added, then waits to be killed."""
    env = {**os.environ, "PYTHONPATH": SRC, "LOGDIR": logdir}
    code = "import os, sys, time, numpy as np, normlog\n" + textwrap.dedent(script)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_ready(process: subprocess.Popen[str], timeout: float = 120) -> None:
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], timeout)[0]:
        process.kill()
        raise AssertionError(f"child not ready in {timeout} s: {process.communicate(timeout=30)}")
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        raise AssertionError(f"child failed: {line}{process.communicate(timeout=30)}")


def signal_when_ready(script: str, logdir: str, signum: int) -> int:
    """Run `script` (see `start`), send `signum` once it prints READY; its exit code."""
    process = start(script, logdir)
    wait_ready(process)
    process.send_signal(signum)
    return process.wait(timeout=120)


def steps_of(logdir: str, tag: str = "loss") -> list[int]:
    return sorted(scalars(read_events(logdir), tag))


ADD_100_STEPS = """
    writer = normlog.Writer(os.environ["LOGDIR"], **KWARGS)
    for step in range(100):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
        writer.add_histogram("weights", np.random.default_rng(step).normal(size=1000), step)
"""


@pytest.mark.parametrize("flush", [True, False])
def test_sigkill_after_flush_loses_nothing_and_without_flush_only_the_last_moment(tmp_path, flush) -> None:
    # Guarantee: a killed process keeps every event added before flush(); with the default
    # settings, it loses only what was still queued, normally the last milliseconds' events
    # (here every event added half a second before the kill is there).
    script = "KWARGS = {}\n" + textwrap.dedent(ADD_100_STEPS)
    script += "writer.flush()\n" if flush else "time.sleep(0.5)\n"
    script += "print('READY', flush=True)\ntime.sleep(600)\n"
    assert signal_when_ready(script, str(tmp_path), signal.SIGKILL) == -signal.SIGKILL
    assert steps_of(str(tmp_path)) == list(range(100))
    assert sorted(e.step for e in read_events(str(tmp_path)).Histograms("weights")) == list(range(100))


def test_the_file_is_synced_on_the_flush_timer(tmp_path) -> None:
    # Guarantee: the thread fsyncs within flush_secs of a write, without flush() or close().
    script = (
        "KWARGS = {'flush_secs': 0.2}\n"
        + textwrap.dedent(ADD_100_STEPS)
        + """
synced = []
real = os.fsync
os.fsync = lambda fd: (synced.append(fd), real(fd))[1]
writer.add_scalar("loss", 0.0, 100)
time.sleep(1.0)
print("READY" if synced else "NOT SYNCED", flush=True)
time.sleep(600)
"""
    )
    assert signal_when_ready(script, str(tmp_path), signal.SIGKILL) == -signal.SIGKILL
    assert steps_of(str(tmp_path)) == list(range(101))


def test_sigterm_closes_the_writer_and_still_ends_the_process(tmp_path) -> None:
    # Guarantee: SIGTERM (what schedulers and torchrun send) writes out and closes every
    # open event file, and the process still dies of SIGTERM.
    script = "KWARGS = {'flush_secs': 10_000}\n" + textwrap.dedent(ADD_100_STEPS)
    script += "print('READY', flush=True)\ntime.sleep(600)\n"
    assert signal_when_ready(script, str(tmp_path), signal.SIGTERM) == -signal.SIGTERM
    assert steps_of(str(tmp_path)) == list(range(100))


def test_sigterm_while_the_main_thread_holds_the_files_lock_still_closes_it(tmp_path) -> None:
    # The handler runs in the main thread between bytecodes, possibly inside add()'s
    # critical sections: writing out must not wait on a lock its own thread holds.
    script = (
        "KWARGS = {'flush_secs': 10_000}\n"
        + textwrap.dedent(ADD_100_STEPS)
        + """
with writer._lock, writer._file._sink.lock:
    os.kill(os.getpid(), __import__("signal").SIGTERM)
    time.sleep(600)
"""
    )
    process = start(script, str(tmp_path))
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGTERM
    assert steps_of(str(tmp_path)) == list(range(100))


def test_a_users_own_sigterm_handler_is_left_alone(tmp_path) -> None:
    script = """
    import signal
    signal.signal(signal.SIGTERM, lambda *_: (print("USER HANDLER", flush=True), sys.exit(3)))
    writer = normlog.Writer(os.environ["LOGDIR"], flush_secs=10_000)
    writer.add_scalar("loss", 1.0, 0)
    print("READY", flush=True)
    time.sleep(600)
    """
    process = start(script, str(tmp_path))
    wait_ready(process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert "USER HANDLER" in out and process.returncode == 3
    assert steps_of(str(tmp_path)) == [0]  # sys.exit ran atexit, which closed the file


def test_interpreter_exit_without_close_keeps_every_event(tmp_path) -> None:
    script = "KWARGS = {'flush_secs': 10_000}\n" + textwrap.dedent(ADD_100_STEPS) + "print('READY', flush=True)\n"
    process = start(script, str(tmp_path))
    wait_ready(process)
    assert process.wait(timeout=120) == 0
    assert steps_of(str(tmp_path)) == list(range(100))


def test_a_full_disk_warns_training_goes_on_and_logging_resumes(tmp_path) -> None:
    # Guarantee: a write that fails (here the file-size limit, as a full disk would) warns
    # once, never raises into training, leaves every whole record readable, counts exactly
    # the events that are missing, and logging resumes when space returns. Python ignores
    # SIGXFSZ, so writes fail with EFBIG. Each record is written on its own, so the small
    # ones still fit under the limit after the big ones fail: that is not "working again";
    # the file growing past the write that failed is.
    script = """
    import resource, warnings
    warnings.simplefilter("always")
    writer = normlog.Writer(os.environ["LOGDIR"], flush_secs=10_000)
    path = writer._file.path
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    for step in range(20):
        writer.add_scalar("loss", float(step), step)
    writer.flush()
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 3000, hard))
    trained = 0
    for step in range(20, 120):  # the limit falls somewhere in here
        writer.add_scalar("loss", float(step), step)
        writer.flush()
        writer.add_histogram("weights", np.arange(step, step + 50.0), step)
        writer.flush()
        trained += 1
    lost = writer.lost_events
    print("SPACE RETURNS", file=sys.stderr, flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    for step in range(120, 130):
        writer.add_scalar("loss", float(step), step)
        writer.add_histogram("weights", np.arange(step, step + 50.0), step)
    writer.close()
    print("TRAINED", trained, "LOST", lost, "AFTER", writer.lost_events, flush=True)
    """
    process = start(script, str(tmp_path))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    _, trained, _, lost, _, after = out.split()
    assert int(trained) == 100 and int(lost) > 0 and int(after) == int(lost)
    warned = [line for line in err.splitlines() if "RuntimeWarning: normlog:" in line]
    assert ["cannot write to" in line and "File too large" in line for line in warned] == [True, False], err
    assert "writing works again" in warned[1] and err.index("SPACE RETURNS") < err.index(warned[1])
    steps = steps_of(str(tmp_path))
    histograms = read_events(str(tmp_path)).Histograms("weights")
    assert steps[:21] == list(range(21)) and steps[-10:] == list(range(120, 130))
    assert 25 < len(steps) < 130  # some events made it before the limit, the rest were dropped
    assert int(lost) == (130 - len(steps)) + (110 - len(histograms))  # lost_events counts exactly the missing
    assert len(event_files(str(tmp_path))) == 1


def test_a_slow_disk_never_blocks_and_memory_stays_bounded(tmp_path) -> None:
    from normlog._eventfile import EventFile

    event_file = EventFile(str(tmp_path), max_pending=10_000)
    proto = __import__("tensorboardX.proto.event_pb2", fromlist=["Event"])
    events = [proto.Event(step=step, file_version="x" * 100) for step in range(1000)]
    # hold the thread off, as a hung disk would
    with event_file._sink.write_lock, pytest.warns(RuntimeWarning, match="behind"):
        list(map(event_file.add, events))
    assert event_file.lost > 900
    event_file.close()


def test_an_unexpected_error_in_the_writer_thread_warns_and_drops_instead_of_queueing(tmp_path, monkeypatch) -> None:
    writer = normlog.Writer(tmp_path)
    writer.add_scalar("loss", 1.0, 0)
    writer.flush()
    monkeypatch.setattr(writer._file._sink, "write_all", lambda data: 1 / 0)
    with pytest.warns(RuntimeWarning, match="stopped"):  # noqa: PT031 (the thread warns: wait for it)
        writer.add_scalar("loss", 2.0, 1)
        writer._file._sink.thread.join(timeout=30)
    for step in range(2, 50):
        writer.add_scalar("loss", 3.0, step)  # no queue grows behind a dead thread
    assert writer._file._sink.queue.empty() and writer.lost_events == 49
    writer.flush()
    writer.close()
    assert steps_of(str(tmp_path)) == [0]


def test_eight_threads_on_one_writer_lose_no_event(tmp_path) -> None:
    writer = normlog.Writer(tmp_path)

    def work(thread: int) -> None:
        for step in range(250):
            writer.add_scalar(f"thread{thread}/loss", step * 0.5, step)
            if step % 25 == 0:
                writer.add_histogram(f"thread{thread}/weights", np.full(10, thread), step)
            writer.add_scalars(f"thread{thread}/pair", {"a": step, "b": -step}, step)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    events = read_events(str(tmp_path))
    for i in range(8):
        assert scalars(events, f"thread{i}/loss") == {s: s * 0.5 for s in range(250)}
        assert len(events.Histograms(f"thread{i}/weights")) == 10
        for key, sign in (("a", 1), ("b", -1)):
            run = read_events(os.path.join(str(tmp_path), f"thread{i}/pair", key))
            assert scalars(run, f"thread{i}/pair") == {s: sign * s for s in range(250)}


def test_a_restart_with_purge_step_drops_the_stale_tail(tmp_path) -> None:
    with normlog.Writer(tmp_path) as first:
        for step in range(10):
            first.add_scalar("loss", 1.0, step)
    with normlog.Writer(tmp_path, purge_step=6) as resumed:  # resumed from the step-6 checkpoint
        for step in range(6, 12):
            resumed.add_scalar("loss", 2.0, step)
    assert scalars(read_events(str(tmp_path)), "loss") == {
        **dict.fromkeys(range(6), 1.0),
        **dict.fromkeys(range(6, 12), 2.0),
    }


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tag=st.text(min_size=1, max_size=40),
    step=st.one_of(st.integers(-(2**64), 2**64), st.none(), st.floats(allow_nan=True)),
    value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70)),
)
def test_writer_inputs_fuzzed_never_crash_or_corrupt_the_file(tmp_path, tag, step, value) -> None:
    # Guarantee: odd tags, huge or negative steps, NaN and huge values either go in or are
    # refused with a TypeError/ValueError that names the tag; the file stays readable.
    logdir = tmp_path / f"run{abs(hash((tag, step, value)))}"
    written, refused = 0, []
    with normlog.Writer(logdir) as writer:
        for name, call in (
            (tag, lambda: writer.add_scalar(tag, value, step)),
            (tag + "/h", lambda: writer.add_histogram(tag + "/h", [value, 0.0, value], step)),
            (tag + "/s", lambda: writer.add_stats(tag + "/s", np.array([value, 1.0]), step)),
            (tag + "/t", lambda: writer.add_text(tag + "/t", tag, step)),
        ):
            try:
                call()
                written += 1
            except (TypeError, ValueError) as error:
                refused.append((name, str(error)))
    assert all(repr(name) in message for name, message in refused), refused
    events = read_events(str(logdir))
    tags = events.Tags()
    stored = len(tags["scalars"]) + len(tags["histograms"]) + len(tags["tensors"])
    assert (written > 0) == (stored > 0)
    if isinstance(step, int) and -(2**63) <= step < 2**63 and isinstance(value, float) and math.isfinite(value):
        assert written == 4


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_an_unwritable_logdir_fails_when_the_watcher_is_made(tmp_path, framework) -> None:
    # Guarantee: a log directory that cannot be written fails before training starts.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    if framework == "torch":
        torch = requires("torch")
        with pytest.raises(OSError, match="cannot write event files in log directory"):
            normlog.watch(torch.nn.Linear(2, 2), blocker / "run")
    else:
        keras = requires("keras")
        watch = importlib.import_module("normlog.keras").watch
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        with pytest.raises(OSError, match="cannot write event files in log directory"):
            watch(model, blocker / "run")


def test_background_work_runs_in_order_and_a_full_queue_holds_the_caller_back() -> None:
    # README Guarantees: on a GPU, a logged step is written by a background thread, which
    # never lets work pile up without bound
    from normlog._watching import Background

    background, done, gate = Background(depth=2), [], threading.Event()
    background.submit(gate.wait)  # taken by the thread, which then waits on the gate
    background.submit(lambda: done.append(1))
    background.submit(lambda: done.append(2))  # the queue now holds two
    third = threading.Thread(target=background.submit, args=(lambda: done.append(3),))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive() and done == []  # held back until the thread takes more work
    gate.set()
    third.join(timeout=60)
    background.wait()
    assert done == [1, 2, 3]
    background.stop()


def test_background_work_done_is_not_kept_alive_by_the_waiting_thread() -> None:
    # On a GPU a watcher's writing runs on this thread; a job it has finished must not keep the
    # watcher (and so its Writer) alive while the thread waits for the next one.
    import gc
    import weakref

    from normlog._watching import Background

    class Job:
        def __call__(self) -> None:
            pass

    background = Background()
    job = Job()
    reference = weakref.ref(job)
    background.submit(job)
    background.wait()
    del job
    gc.collect()
    try:
        assert reference() is None
    finally:
        background.stop()
