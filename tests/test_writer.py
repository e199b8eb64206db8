"""Writer: what TensorBoard's own reader gets back, against numpy on the same data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import normlog
from helpers import event_files, read_events, requires, scalars

RNG = np.random.default_rng(99)


def test_scalars_read_back(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer:
        for step in range(5):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
        writer.add_scalar("loss/nan", float("nan"), 0)
        writer.add_scalar("count", np.int64(7), 3)
    events = read_events(str(tmp_path))
    assert scalars(events, "loss") == pytest.approx({step: 1.0 / (step + 1) for step in range(5)})
    assert np.isnan(scalars(events, "loss/nan")[0])
    assert scalars(events, "count") == {3: 7.0}


def test_histogram_reads_back_as_numpy_computes_it(tmp_path) -> None:
    x = RNG.normal(2.0, 0.5, size=(40, 50)).astype(np.float32)
    with normlog.Writer(tmp_path) as writer:
        writer.add_histogram("layer1/weights", x, step=3)
    (event,) = read_events(str(tmp_path)).Histograms("layer1/weights")
    value = event.histogram_value
    x64 = x.astype(np.float64).ravel()
    counts, edges = np.histogram(x64, bins=30)
    assert event.step == 3
    assert (value.min, value.max, value.num) == (x64.min(), x64.max(), x64.size)
    assert value.sum == pytest.approx(x64.sum(), rel=1e-9)
    assert value.sum_squares == pytest.approx(x64 @ x64, rel=1e-9)
    np.testing.assert_array_equal(value.bucket, counts)
    np.testing.assert_allclose(value.bucket_limit, edges[1:], rtol=1e-15)


def test_histogram_with_nan_and_inf_keeps_finite_min_max_sum_and_counts_the_rest(tmp_path) -> None:
    x = np.concatenate([RNG.normal(size=500), [np.nan, np.nan, np.inf, -np.inf]])
    with normlog.Writer(tmp_path) as writer:
        writer.add_histogram("grad", x, 0)
        writer.add_histogram("all_nan", np.full(10, np.nan), 0)
        writer.add_histogram("one_nan", [1.0, np.nan], 0)
    events = read_events(str(tmp_path))
    finite = x[np.isfinite(x)]
    value = events.Histograms("grad")[0].histogram_value
    assert (value.min, value.max, value.num) == (finite.min(), finite.max(), finite.size)
    assert value.sum == pytest.approx(finite.sum(), rel=1e-9)
    np.testing.assert_array_equal(value.bucket, np.histogram(finite, bins=30)[0])
    assert scalars(events, "grad/nonfinite") == {0: 4.0}
    empty = events.Histograms("all_nan")[0].histogram_value
    assert (empty.num, empty.min, empty.max, empty.sum, sum(empty.bucket)) == (0, 0.0, 0.0, 0.0, 0)
    assert scalars(events, "all_nan/nonfinite") == {0: 10.0}
    one = events.Histograms("one_nan")[0].histogram_value
    assert (one.min, one.max, one.sum, one.num) == (1.0, 1.0, 1.0, 1)
    assert "one_nan/nonfinite" in events.Tags()["scalars"]


def test_tensorflow_bins_write_only_the_occupied_buckets(tmp_path) -> None:
    x = np.array([0.5, 0.6, 2.0, 1e30])
    with normlog.Writer(tmp_path) as writer:
        hist = writer.add_histogram("h", x, 0, bins="tensorflow")
    value = read_events(str(tmp_path)).Histograms("h")[0].histogram_value
    filled = np.flatnonzero(hist.counts)
    assert sum(value.bucket) == 4 and value.max == 1e30
    np.testing.assert_array_equal(value.bucket, hist.counts[filled[0] : filled[-1] + 1])


def test_default_histogram_equals_tf_summary_histogram(tmp_path) -> None:
    tf = requires("tensorflow")
    from tensorboard.util import tensor_util

    data = {
        "normal": RNG.normal(size=10_000),
        "skewed": RNG.exponential(size=3000) ** 3,
        "ints": RNG.integers(-5, 9, 999),
    }
    tf_writer = tf.summary.create_file_writer(str(tmp_path / "tf"))
    with tf_writer.as_default():
        for tag, x in data.items():
            tf.summary.histogram(tag, x, step=0)
    tf_writer.close()
    events = read_events(str(tmp_path / "tf"))
    for tag, x in data.items():
        expected = tensor_util.make_ndarray(events.Tensors(tag)[0].tensor_proto)
        hist = normlog.histogram(x)
        np.testing.assert_allclose(hist.edges[:-1], expected[:, 0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(hist.edges[1:], expected[:, 1], rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(hist.counts, expected[:, 2])


def test_norm_and_stats(tmp_path) -> None:
    x = np.concatenate([RNG.normal(size=1000), [np.inf]])
    finite = x[:-1]
    with normlog.Writer(tmp_path) as writer:
        norm = writer.add_norm("w/norm", finite, 1)
        stats = writer.add_stats("w", x, 1)
    events = read_events(str(tmp_path))
    assert norm == pytest.approx(np.linalg.norm(finite), rel=1e-12)
    # simple_value is a float32 in the proto
    assert scalars(events, "w/norm")[1] == pytest.approx(np.linalg.norm(finite), rel=1e-6)
    expected = {"mean": finite.mean(), "std": finite.std(), "min": finite.min(), "max": finite.max(), "nonfinite": 1}
    for name, value in expected.items():
        assert scalars(events, f"w/{name}")[1] == pytest.approx(value, rel=1e-6), name
    assert stats.posinf == 1


def test_add_scalars_writes_one_run_per_key(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer:
        for step in range(3):
            writer.add_scalars("loss", {"train": step, "test": 2 * step}, step)
    for key, factor in (("train", 1), ("test", 2)):
        run = tmp_path / "loss" / key
        assert scalars(read_events(str(run)), "loss") == {s: factor * s for s in range(3)}


def test_two_writers_made_in_the_same_second_keep_all_their_events(tmp_path) -> None:
    for _ in range(20):  # tensorboardX names files by the second: make both within one
        start = int(time.time())
        first, second = normlog.Writer(tmp_path / "run"), normlog.Writer(tmp_path / "run")
        if int(time.time()) == start:
            break
        first.close()
        second.close()
        for path in event_files(str(tmp_path)):
            os.remove(path)
    for step in range(50):
        first.add_scalar("a", step, step)
        second.add_scalar("b", -step, step)
    first.close()
    second.close()
    files = event_files(str(tmp_path))
    assert len(files) == 2
    by_tag = {}
    for path in files:
        events = read_events(path)
        (tag,) = events.Tags()["scalars"]
        by_tag[tag] = scalars(events, tag)
    assert by_tag == {"a": {s: s for s in range(50)}, "b": {s: -s for s in range(50)}}


def test_flush_makes_every_added_event_durable(tmp_path) -> None:
    writer = normlog.Writer(tmp_path, flush_secs=10_000)
    for step in range(500):
        writer.add_scalar("x", step, step)
    writer.add_histogram("h", RNG.normal(size=100), 499)
    writer.flush()
    events = read_events(event_files(str(tmp_path))[0])  # read while the writer is still open
    assert len(events.Scalars("x")) == 500 and len(events.Histograms("h")) == 1
    writer.add_scalar("x", 500, 500)  # still writing after a flush
    writer.close()
    assert len(read_events(str(tmp_path)).Scalars("x")) == 501


def test_close_is_idempotent_and_a_closed_writer_refuses_more(tmp_path) -> None:
    writer = normlog.Writer(tmp_path)
    writer.add_scalar("x", 1.0, 0)
    writer.close()
    writer.close()
    writer.flush()
    with pytest.raises(ValueError, match="closed"):
        writer.add_scalar("x", 2.0, 1)
    assert len(event_files(str(tmp_path))) == 1


def test_unwritable_logdir_fails_when_the_writer_is_made(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="log directory"):
        normlog.Writer(blocker / "run")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda w: w.add_scalar("bad/scalar", "abc", 0), TypeError),
        (lambda w: w.add_scalar("bad/scalar", [1.0, 2.0], 0), ValueError),
        (lambda w: w.add_histogram("bad/hist", ["a", "b"], 0), TypeError),
        (lambda w: w.add_histogram("bad/hist", np.array([1j]), 0), TypeError),
        (lambda w: w.add_histogram("bad/hist", [1.0, 2.0], 0, bins=0), ValueError),
        (lambda w: w.add_norm("bad/norm", {"a": 1}, 0), TypeError),
        (lambda w: w.add_image("bad/image", np.zeros((5, 4)), 0, dataformats="CHW"), ValueError),
        (lambda w: w.add_image("bad/image", np.zeros((2, 5, 4)), 0, dataformats="CHW"), ValueError),
        (lambda w: w.add_text("bad/text", 3, 0), TypeError),
        (lambda w: w.add_figure("bad/figure", np.zeros(3), 0), TypeError),
        (lambda w: w.add_scalars("bad", {"x": "y"}, 0), TypeError),
    ],
)
def test_bad_input_errors_name_the_tag(tmp_path, call, error) -> None:
    with normlog.Writer(tmp_path) as writer:
        with pytest.raises(error, match="'bad"):
            call(writer)


@pytest.mark.parametrize("tag", [3, None, b"bytes"])
def test_a_tag_must_be_a_string(tmp_path, tag) -> None:
    with normlog.Writer(tmp_path) as writer, pytest.raises(TypeError, match="tag must be a string"):
        writer.add_scalar(tag, 1.0, 0)


@pytest.mark.parametrize(
    ("image", "dataformats", "shape"),
    [
        (np.linspace(0, 1, 3 * 8 * 6).reshape(3, 8, 6), "CHW", (8, 6)),
        ((np.arange(8 * 6 * 4) % 256).astype(np.uint8).reshape(8, 6, 4), "HWC", (8, 6)),
        (np.linspace(0, 1, 8 * 6).reshape(8, 6), "HW", (8, 6)),
    ],
)
def test_add_image_writes_a_png_tensorboard_reads(tmp_path, image, dataformats, shape) -> None:
    with normlog.Writer(tmp_path) as writer:
        writer.add_image("img", image, 2, dataformats=dataformats)
    (event,) = read_events(str(tmp_path)).Images("img")
    assert (event.step, event.height, event.width) == (2, *shape)
    assert event.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")


def test_add_image_pixels_survive_the_round_trip(tmp_path) -> None:
    pil = requires("PIL.Image")
    import io

    image = RNG.integers(0, 256, size=(7, 5, 3)).astype(np.uint8)
    with normlog.Writer(tmp_path) as writer:
        writer.add_image("img", image, 0, dataformats="HWC")
    (event,) = read_events(str(tmp_path)).Images("img")
    np.testing.assert_array_equal(np.asarray(pil.open(io.BytesIO(event.encoded_image_string))), image)


def test_add_figure(tmp_path) -> None:
    requires("matplotlib")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(3, 2), dpi=50)
    axes.plot([0, 1, 2], [1, 0, 1])
    with normlog.Writer(tmp_path) as writer:
        writer.add_figure("fig", figure, 4)
    (event,) = read_events(str(tmp_path)).Images("fig")
    assert (event.step, event.width, event.height) == (4, 150, 100)
    assert not plt.fignum_exists(figure.number)


def test_add_text(tmp_path) -> None:
    from tensorboard.util import tensor_util

    with normlog.Writer(tmp_path) as writer:
        writer.add_text("notes", "**lr** = 0.1", 0)
    (event,) = read_events(str(tmp_path)).Tensors("notes/text_summary")
    assert tensor_util.make_ndarray(event.tensor_proto).item() == b"**lr** = 0.1"


def test_torch_tensors_of_any_float_dtype_with_grad(tmp_path) -> None:
    torch = requires("torch")
    base = torch.randn(300, generator=torch.Generator().manual_seed(0))
    with normlog.Writer(tmp_path) as writer:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            tensor = base.to(dtype).requires_grad_()
            expected = tensor.detach().double().numpy()
            hist = writer.add_histogram(f"t/{dtype}", tensor, 0)
            np.testing.assert_array_equal(hist.counts, normlog.histogram(expected).counts)
            assert writer.add_norm(f"n/{dtype}", tensor, 0) == pytest.approx(np.linalg.norm(expected), rel=1e-12)
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([3.0, 4.0]), (10,))
        assert writer.add_norm("sparse", sparse, 0) == 5.0
        assert writer.add_stats("sparse", sparse, 0).zeros == 8
        writer.add_scalar("scalar", torch.tensor(2.5, requires_grad=True), 0)
    assert scalars(read_events(str(tmp_path)), "scalar") == {0: 2.5}


def test_tensorflow_tensors_and_variables(tmp_path) -> None:
    tf = requires("tensorflow")
    x = RNG.normal(size=(20, 10)).astype(np.float32)
    with normlog.Writer(tmp_path) as writer:
        for name, value in [
            ("tensor", tf.constant(x)),
            ("variable", tf.Variable(x)),
            ("bf16", tf.cast(x, tf.bfloat16)),
        ]:
            expected = np.asarray(value).astype(np.float64)
            hist = writer.add_histogram(name, value, 0)
            np.testing.assert_array_equal(hist.counts, normlog.histogram(expected).counts)
            assert writer.add_norm(f"{name}/norm", value, 0) == pytest.approx(np.linalg.norm(expected), rel=1e-12)


def test_importing_normlog_and_logging_numpy_imports_no_framework(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import normlog
        x = np.random.default_rng(0).normal(size=1000)
        normlog.summarize(x), normlog.histogram(x), normlog.l2_norm(x)
        with normlog.Writer({str(tmp_path)!r}) as writer:
            writer.add_histogram("h", x, 0)
            writer.add_stats("s", x, 0)
            writer.add_scalar("x", 1.0, 0)
            writer.add_image("i", np.zeros((3, 4, 4)), 0)
            writer.add_text("t", "hi", 0)
        heavy = [m for m in ("torch", "tensorflow", "keras", "jax", "matplotlib") if m in sys.modules]
        print(heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_hand_encoded_event_parses_to_the_protobuf_one() -> None:
    # normlog._proto encodes events field by field; protobuf must read back exactly what
    # tensorboardX's own objects would have held
    from tensorboardX.proto import event_pb2, summary_pb2

    from normlog._proto import encode_event, encode_summary, proto_buckets

    # field lengths of one, two (64 buckets) and three (1100 buckets) varint bytes
    tagged = [
        ("w/a", normlog.histogram(np.array([1.0, 2.0, 2.5, np.nan, np.inf]), 5)),
        ("w b", normlog.histogram(np.zeros(0), 3)),
        ("w/64", normlog.histogram(np.arange(100.0), 64)),
        ("w/1100", normlog.histogram(np.arange(3000.0), 1100)),
    ]
    scalars = [("loss", 0.25), ("grad/ü tag", float("nan")), ("big", 1e39), ("count", 7)]
    for step in (0, 3, -2, 2**62):
        encoded = encode_event(1700000000.5, step, encode_summary(scalars, tagged))
        values = [summary_pb2.Summary.Value(tag=_clean(tag), simple_value=value) for tag, value in scalars]
        for tag, hist in tagged:
            limits, counts = proto_buckets(hist)
            proto = summary_pb2.HistogramProto(
                min=hist.min, max=hist.max, num=hist.num, sum=hist.sum, sum_squares=hist.sum_squares,
                bucket_limit=limits.tolist(), bucket=counts.tolist(),
            )  # fmt: skip
            values.append(summary_pb2.Summary.Value(tag=_clean(tag), histo=proto))
        expected = event_pb2.Event(wall_time=1700000000.5, step=step, summary=summary_pb2.Summary(value=values))
        got = event_pb2.Event.FromString(encoded)
        # NaN != NaN in protobuf's equality: compare the canonical bytes instead
        assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def _clean(tag: str) -> str:
    from tensorboardX.summary import _clean_tag

    return str(_clean_tag(tag))


def test_errors_of_add_scalars_keys_and_of_a_closed_writer_name_the_tag(tmp_path) -> None:
    writer = normlog.Writer(tmp_path)
    with pytest.raises(TypeError, match=r"tag 'loss': the keys of add_scalars .* got 3 \(int\)"):
        writer.add_scalars("loss", {3: 1.0})
    writer.close()
    for add in (lambda: writer.add_scalar("loss", 1.0), lambda: writer.add_scalars("loss", {"train": 1.0})):
        with pytest.raises(ValueError, match="tag 'loss': cannot add to a closed Writer"):
            add()
