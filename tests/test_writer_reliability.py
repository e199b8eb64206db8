"""The Writer and its event files under attack: forked children, SIGTERM in its many
shapes, dropped Writers, a disk that fills up, tags that look like paths. What is about
processes and signals runs in real subprocesses; every file is read back with TensorBoard's
own reader. Each test names the promise it proves in the README's Guarantees section."""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import normlog
from helpers import event_files, read_events, scalars

SRC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")


def start(script: str, logdir: str) -> subprocess.Popen[str]:
    """`script` in a fresh interpreter, with `logdir` as LOGDIR."""
    env = {**os.environ, "PYTHONPATH": SRC, "LOGDIR": logdir}
    code = "import os, sys, time, numpy as np, normlog\n" + textwrap.dedent(script)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=30)
        raise AssertionError(f"the child did not end in {timeout} s:\n{out}\n{err}") from None


def wait_ready(process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait for the child's READY line."""
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], timeout)[0]:
        process.kill()
        raise AssertionError(f"child not ready in {timeout} s: {process.communicate(timeout=30)}")
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        raise AssertionError(f"child failed: {line}{process.communicate(timeout=30)}")


def steps_of(logdir: str, tag: str) -> list[int]:
    return sorted(scalars(read_events(logdir), tag))


# -- forked children -----------------------------------------------------------------


def test_183_forked_children_of_a_busy_writer_all_die_of_terminate(tmp_path) -> None:
    # Guarantee: children forked while the Writer's threads hold its locks neither hang
    # logging through the Writer they inherited nor in a SIGTERM handler that waits on those
    # locks: every one dies of Process.terminate().
    script = """
    import multiprocessing, signal, threading
    writer = normlog.Writer(os.environ["LOGDIR"], flush_secs=0.001)  # the thread locks, writes, fsyncs all the time
    stop = threading.Event()
    def busy():
        step = 0
        while not stop.is_set():
            writer.add_scalar("parent", 1.0, step)
            writer.add_histogram("weights", np.arange(100.0), step)
            step += 1
    busy_thread = threading.Thread(target=busy, daemon=True)
    busy_thread.start()
    time.sleep(0.2)
    def child(logs):  # logs through the Writer it inherited, or not; then waits
        for step in range(10 if logs else 0):
            writer.add_scalar("child", 1.0, step)
        time.sleep(600)
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=child, args=(index % 2 == 0,)) for index in range(183)]
    for child in children:
        child.start()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + 120
    for child in children:
        child.join(max(0.01, deadline - time.monotonic()))
    alive = [child for child in children if child.is_alive()]
    for child in alive:
        child.kill()
        child.join()
    stop.set()
    busy_thread.join()
    writer.close()
    print(json.dumps({"alive": len(alive), "codes": sorted({str(c.exitcode) for c in children})}))
    """
    process = start("import json\n" + textwrap.dedent(script), str(tmp_path))
    out, err = finish(process)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert result == {"alive": 0, "codes": [str(-signal.SIGTERM)]}, err[-3000:]


FORKED_CHILDREN = """
import multiprocessing
fork = multiprocessing.get_context("fork")
logdir = os.environ["LOGDIR"]
writer = normlog.Writer(logdir, flush_secs=10_000)
writer.add_scalar("parent", 0.0, 0)

def inherited(count):  # the parent's Writer, used in the child; the child never closes it
    for step in range(count):
        writer.add_scalar("child", float(step), step)

def own(count):  # a Writer of the child's own, never closed
    child_writer = normlog.Writer(os.path.join(logdir, "own"), flush_secs=10_000)
    for step in range(count):
        child_writer.add_scalar("own", float(step), step)

def logs_then_waits(count, logged):
    for step in range(count):
        writer.add_scalar("terminated", float(step), step)
    logged.set()
    time.sleep(600)

codes = []
for target, args in ((inherited, (1000,)), (own, (20_000,))):
    child = fork.Process(target=target, args=args)
    child.start()
    child.join(120)
    codes.append(child.exitcode)
logged = fork.Event()
child = fork.Process(target=logs_then_waits, args=(1000, logged))
child.start()
logged.wait(120)
child.terminate()
child.join(120)
codes.append(child.exitcode)
writer.add_scalar("parent", 1.0, 1)
writer.close()
print(*codes, flush=True)
"""


def test_events_written_in_forked_children_reach_their_own_files(tmp_path) -> None:
    # Guarantee: a Writer inherited by a fork()ed child keeps working there: the child's
    # events go to an event file of its own in the same run (none of the parent's queue is
    # written twice), and the child writes them out when it returns (multiprocessing ends
    # it with os._exit, past atexit) or dies of SIGTERM. A Writer the child makes itself
    # and never closes keeps every event too.
    process = start(FORKED_CHILDREN, str(tmp_path))
    out, err = finish(process)
    assert process.returncode == 0, err
    assert out.split() == ["0", "0", str(-signal.SIGTERM)], err
    events = read_events(str(tmp_path))
    assert steps_of(str(tmp_path), "child") == list(range(1000))
    assert steps_of(str(tmp_path), "terminated") == list(range(1000))
    assert scalars(events, "parent") == {0: 0.0, 1: 1.0}  # once each: the children did not rewrite them
    assert steps_of(str(tmp_path / "own"), "own") == list(range(20_000))
    # the parent's file, and one file per child that logged through the inherited Writer
    assert len([p for p in event_files(str(tmp_path)) if os.path.dirname(p) == str(tmp_path)]) == 3
    assert "Traceback" not in err, err


# -- SIGTERM -------------------------------------------------------------------------

SLOW_DISK = """
import signal
real_write = os.write
def slow_write(fd, data):  # every write of the thread takes half a second: events stay queued
    time.sleep(0.5)
    return real_write(fd, data)
"""


def test_sigterm_is_handled_when_the_first_writer_is_made_on_another_thread(tmp_path) -> None:
    # Guarantee: a Writer made on a worker thread still gets normlog's SIGTERM handling: it
    # is installed at the next add_* on the main thread (signal handlers can only be set
    # there). A slow disk keeps events queued when the signal comes; all are written.
    script = SLOW_DISK + textwrap.dedent("""
    import threading
    made = []
    thread = threading.Thread(target=lambda: made.append(normlog.Writer(os.environ["LOGDIR"], flush_secs=10_000)))
    thread.start()
    thread.join()
    (writer,) = made
    os.write = slow_write
    for step in range(100):
        writer.add_scalar("loss", float(step), step)
    print("READY", flush=True)
    time.sleep(600)
    """)
    process = start(script, str(tmp_path))
    wait_ready(process)
    process.send_signal(signal.SIGTERM)
    _, err = finish(process)
    assert process.returncode == -signal.SIGTERM, err
    assert steps_of(str(tmp_path), "loss") == list(range(100))


def test_sigterm_without_a_main_thread_writer_is_explained_once(tmp_path) -> None:
    # When no add_* ever runs on the main thread, normlog cannot install its handler, and
    # says so once, however many Writers are made.
    script = """
    import threading, warnings
    warnings.simplefilter("always")
    def work(index):
        writer = normlog.Writer(os.path.join(os.environ["LOGDIR"], str(index)))
        writer.add_scalar("loss", 1.0, 0)
        writer.close()
    for index in range(3):
        thread = threading.Thread(target=work, args=(index,))
        thread.start()
        thread.join()
    """
    process = start(script, str(tmp_path))
    _, err = finish(process)
    assert process.returncode == 0, err
    (warning,) = [line for line in err.splitlines() if "RuntimeWarning" in line]
    assert "SIGTERM" in warning and "main thread" in warning, err


def test_a_user_handler_that_calls_normlogs_first_goes_on_after_it(tmp_path) -> None:
    # Guarantee: a handler of your own installed after normlog's, which calls the previous
    # handler (normlog's) first, is not killed inside it: normlog's writes out the queue and
    # returns, and your handler finishes (here it logs once more and exits with code 3).
    script = """
    import signal
    writer = normlog.Writer(os.environ["LOGDIR"], flush_secs=10_000)
    previous = signal.getsignal(signal.SIGTERM)
    def handler(signum, frame):
        previous(signum, frame)
        print("AFTER NORMLOG", flush=True)
        writer.add_scalar("loss", -1.0, 100)
        sys.exit(3)
    signal.signal(signal.SIGTERM, handler)
    for step in range(100):
        writer.add_scalar("loss", float(step), step)
    print("READY", flush=True)
    time.sleep(600)
    """
    process = start(script, str(tmp_path))
    wait_ready(process)
    process.send_signal(signal.SIGTERM)
    out, err = finish(process)
    assert "AFTER NORMLOG" in out and process.returncode == 3, err
    assert steps_of(str(tmp_path), "loss") == list(range(101))


def test_sigterm_during_a_long_c_call_kills_promptly_and_keeps_the_events(tmp_path) -> None:
    # Guarantee: normlog's handling does not wait for the main thread to leave a long C call
    # (a Python-level handler would run only after it): the process dies of SIGTERM within
    # seconds, with every queued event written. The C call here runs for half a minute or more.
    script = """
    import hashlib
    writer = normlog.Writer(os.environ["LOGDIR"], flush_secs=10_000)
    for step in range(100):
        writer.add_scalar("loss", float(step), step)
    print("READY", flush=True)
    hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2 * 10**7)  # one C call, the GIL released
    print("C CALL ENDED", flush=True)
    """
    process = start(script, str(tmp_path))
    wait_ready(process)
    time.sleep(0.5)  # into the C call
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = finish(process)
    died_after = time.monotonic() - sent
    assert process.returncode == -signal.SIGTERM and "C CALL ENDED" not in out, err
    assert died_after < 5.0, f"died {died_after:.1f} s after SIGTERM"  # generous: the fix dies in milliseconds
    assert steps_of(str(tmp_path), "loss") == list(range(100))


# -- dropped Writers -------------------------------------------------------------------


def _writer_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("normlog writer")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_dropped_writer_releases_its_thread_and_descriptor_and_keeps_its_events(tmp_path) -> None:
    # Guarantee: a Writer dropped without close() (its last reference gone) closes its files
    # and ends its threads, having written every event: 100 of them leave no thread and no
    # descriptor behind.
    normlog.Writer(tmp_path / "first").close()  # what a process sets up once (SIGTERM handling), before counting
    gc.collect()
    threads_before, descriptors_before = _writer_threads(), len(os.listdir("/proc/self/fd"))
    for index in range(100):
        writer = normlog.Writer(tmp_path / f"run{index}", flush_secs=10_000)
        writer.add_scalar("loss", float(index), 0)
        writer.add_scalars("pair", {"a": float(index)}, 0)  # a second file
    del writer
    gc.collect()
    deadline = time.monotonic() + 60
    for thread in _writer_threads() - threads_before:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert _writer_threads() - threads_before == set()
    assert len(os.listdir("/proc/self/fd")) <= descriptors_before
    for index in range(100):
        assert scalars(read_events(str(tmp_path / f"run{index}")), "loss") == {0: float(index)}
        assert scalars(read_events(str(tmp_path / f"run{index}" / "pair" / "a")), "pair") == {0: float(index)}


# -- a full disk -----------------------------------------------------------------------

FULL_DISK = """
import errno, json, warnings
logdir = os.environ["LOGDIR"]
capacity = None  # bytes the disk holds, None: plenty

def used():
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(logdir) for f in files)

real_write = os.write
def full_write(fd, data):  # as a full disk: a write takes what still fits, then fails with ENOSPC
    if capacity is None:
        return real_write(fd, data)
    free = capacity - used()
    if free <= 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, bytes(data[:free]))
os.write = full_write

def messages(caught):
    return [str(w.message) for w in caught]
"""


def test_a_full_disk_warns_once_per_episode_and_says_it_works_again_only_when_it_does(tmp_path) -> None:
    # Guarantee: on a full disk (os.write failing with ENOSPC once what fits is written), 20
    # steps give one warning, not one per step; small records that still fit in the last
    # block do not end the episode ("writing works again" comes once, when space has
    # returned); lost_events equals the events missing from the file.
    script = FULL_DISK + textwrap.dedent("""
    rng = np.random.default_rng(0)
    writer = normlog.Writer(logdir, flush_secs=10_000)

    def step(number):  # a small record and a big one, each written on its own
        writer.add_scalar("loss", float(number), number)
        writer.flush()
        writer.add_histogram("weights", rng.normal(size=5000), number, bins=1000)  # about 16 kB
        writer.flush()

    with warnings.catch_warnings(record=True) as healthy:
        warnings.simplefilter("always")
        for number in range(20):
            step(number)
    capacity = used() + 2000  # 2 kB left: room for the small records, not the big ones
    with warnings.catch_warnings(record=True) as full:
        warnings.simplefilter("always")
        for number in range(20, 40):
            step(number)
    lost_while_full = writer.lost_events
    capacity = None  # space returns
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        for number in range(40, 45):
            step(number)
    writer.close()
    print(json.dumps({"healthy": messages(healthy), "full": messages(full), "after": messages(after),
                      "lost": lost_while_full, "lost_at_end": writer.lost_events}))
    """)
    process = start(script, str(tmp_path))
    out, err = finish(process)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert result["healthy"] == []
    (warning,) = result["full"]
    assert "cannot write to" in warning and "No space left on device" in warning
    (recovered,) = result["after"]
    assert "writing works again" in recovered and "20 events were lost" in recovered
    events = read_events(str(tmp_path))
    assert steps_of(str(tmp_path), "loss") == list(range(45))  # the small records fitted
    histograms = sorted(event.step for event in events.Histograms("weights"))
    assert histograms == [*range(20), *range(40, 45)]
    assert result["lost"] == result["lost_at_end"] == 20


def test_add_scalars_with_a_new_key_on_a_full_disk_warns_once_and_counts_instead_of_raising(tmp_path) -> None:
    # Guarantee: add_scalars with a key never seen before, whose run cannot be created on a
    # full disk, does not raise into training: one warning, its events counted in
    # lost_events; once space returns the run is made and written.
    script = FULL_DISK + textwrap.dedent("""
    writer = normlog.Writer(logdir, flush_secs=10_000)
    writer.add_scalars("loss", {"train": 1.0}, 0)
    writer.flush()
    capacity = used()  # not one byte left
    with warnings.catch_warnings(record=True) as full:
        warnings.simplefilter("always")
        for step in range(1, 21):
            writer.add_scalars("loss", {"test": float(step)}, step)  # a new run, each step refused
    lost = writer.lost_events
    capacity = None
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        writer.add_scalars("loss", {"test": 21.0}, 21)
    writer.close()
    print(json.dumps({"full": messages(full), "after": messages(after), "lost": lost}))
    """)
    process = start(script, str(tmp_path))
    out, err = finish(process)
    assert process.returncode == 0, err
    result = json.loads(out)
    (warning,) = result["full"]
    assert "add_scalars" in warning and "No space left on device" in warning, warning
    assert result["lost"] == 20
    (recovered,) = result["after"]
    assert "20 events were lost" in recovered
    assert steps_of(str(tmp_path / "loss" / "test"), "loss") == [21]
    assert steps_of(str(tmp_path / "loss" / "train"), "loss") == [0]
    # a refused run leaves no empty event file behind
    assert len(event_files(str(tmp_path / "loss" / "test"))) == 1


def test_a_single_event_bigger_than_the_queue_is_refused_with_its_tag_and_size(tmp_path) -> None:
    # Guarantee: an event larger than the 64 MB an event file may queue is dropped with a
    # warning that names its tag and size (not "writing is behind"), counted in
    # lost_events; the Writer goes on writing.
    text = "x" * (64 << 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with normlog.Writer(tmp_path) as writer:
            writer.add_text("notes/huge", text, 0)
            writer.add_scalar("loss", 1.0, 0)
            lost = writer.lost_events
    del text
    (warning,) = [str(w.message) for w in caught]
    assert "'notes/huge'" in warning and "67,1" in warning and "behind" not in warning, warning
    assert lost == 1
    assert scalars(read_events(str(tmp_path)), "loss") == {0: 1.0}


# -- tags are names, never paths -------------------------------------------------------


def test_add_scalars_tags_and_keys_never_write_outside_the_logdir(tmp_path) -> None:
    # Guarantee: add_scalars' main tag and keys name runs inside the logdir, whatever they
    # hold: absolute paths, '..', backslashes. '/' nests runs, as in SummaryWriter.
    logdir = tmp_path / "deep" / "logs"
    outside = tmp_path / "outside"
    calls = {
        "loss": {str(outside / "abs"): 1.0, "../../escape": 2.0, "..": 3.0, "a\\..\\..\\b": 4.0, ".": 5.0, "": 6.0},
        "../../up": {"k": 7.0},
        str(outside): {"k": 8.0},
        "..": {"..": 9.0},
        "a/../../..": {"/": 10.0},
        "\\..\\..": {"k\x00": 11.0},
        "train/loss": {"test": 12.0},
    }
    written_steps = {}  # one step per value: keys that clean to the same run must not overwrite each other
    with normlog.Writer(logdir) as writer:
        for main_tag, values in calls.items():
            for key, value in values.items():
                writer.add_scalars(main_tag, {key: value}, int(value))
                written_steps[int(value)] = value
    everything = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert everything and all(logdir in path.parents for path in everything), everything
    assert not outside.exists()
    written = {}
    for path in event_files(str(logdir)):
        events = read_events(path)
        for tag in events.Tags()["scalars"]:
            written.update(scalars(events, tag))
    assert written == written_steps
    assert steps_of(str(logdir / "train" / "loss" / "test"), "train/loss") == [12]
