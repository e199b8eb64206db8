"""normlog in a Hugging Face Trainer run: a tiny GPT-2 made from a config (no download).

    python examples/torch/hf_trainer.py [OUTPUT_DIR]   # then: tensorboard --logdir OUTPUT_DIR

`normlog.torch.transformers.watch(trainer)` adds a callback: global/grad_norm equals the
Trainer's own train/grad_norm (before clipping) at the same steps, in the same run.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
import transformers

import normlog.torch.transformers


def main(output_dir: str = "runs/hf_trainer") -> str:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    # a learnable toy language: each sequence counts up from a random start, modulo 100
    starts = torch.randint(0, 100, (256, 1))
    tokens = (starts + torch.arange(32)) % 100
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        num_train_epochs=2,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else [],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    callback = normlog.torch.transformers.watch(trainer, histogram_every=4)  # the one line
    trainer.train()
    return callback.run_directory(args)


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
