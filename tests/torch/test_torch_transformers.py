"""normlog.torch.transformers in a real transformers.Trainer (a tiny GPT-2 made from a config,
no download), with gradient accumulation and clipping: `global/grad_norm` equals the
Trainer's own logged `grad_norm` at every logged step, in the Trainer's TensorBoard run."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

from helpers import read_events, requires, scalars

torch = requires("torch")
transformers = requires("transformers")

import normlog.torch.transformers  # noqa: E402
from normlog._step import CLIPPED_GLOBAL_NORM, GLOBAL_NORM  # noqa: E402

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_global_norm_equals_the_trainers_grad_norm_at_its_steps_in_its_run(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 100, (48, 16), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        max_steps=6,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=["tensorboard"] if TENSORBOARD else [],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    callback = normlog.torch.transformers.watch(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    own = {entry["step"]: entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry}
    assert sorted(own) == [1, 2, 3, 4, 5, 6]
    assert any(norm > 0.5 for norm in own.values())  # clipping engaged
    run = callback.run_directory(args)
    events = read_events(run)
    logged = scalars(events, GLOBAL_NORM)
    assert sorted(logged) == sorted(own)
    for step, norm in own.items():
        assert logged[step] == pytest.approx(norm, rel=1e-5)
        assert scalars(events, CLIPPED_GLOBAL_NORM)[step] == pytest.approx(min(norm, 0.5), rel=1e-4)
    if TENSORBOARD:  # the Trainer's own chart of it, in the same run, on the same steps
        theirs = scalars(events, "train/grad_norm")
        assert sorted(theirs) == sorted(logged)
        for step, norm in theirs.items():
            assert logged[step] == pytest.approx(norm, rel=1e-5)


def test_the_example_writes_into_the_trainers_run(tmp_path) -> None:
    import runpy
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "torch" / "hf_trainer.py"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = runpy.run_path(str(example))["main"](str(tmp_path))
    events = read_events(run)
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(1, 17))  # 2 epochs of 8 updates
    if TENSORBOARD:
        assert "train/loss" in events.Tags()["scalars"]
