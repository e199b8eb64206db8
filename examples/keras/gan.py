"""A GAN whose own `train_step` applies two optimizers, watched with one `watch(gan)`; then the
discriminator fine-tuned after a recompile, in the same run with its steps continuing.

`watch(gan)` finds the optimizers the model holds (`d_optimizer`, `g_optimizer`, set in its
`compile`, as keras.io's GAN examples do) and logs both models' gradients in one record per
step: `global/grad_norm` is the norm over both.

    python examples/keras/gan.py [--logdir runs/gan] [--epochs 3]
    tensorboard --logdir runs/gan
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import normlog.keras

LATENT = 4


class GAN(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="gan")
        self.generator = keras.Sequential(
            [keras.Input((LATENT,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)], name="generator"
        )
        self.discriminator = keras.Sequential(
            [keras.Input((2,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)], name="discriminator"
        )

    def compile(self, d_optimizer: keras.optimizers.Optimizer, g_optimizer: keras.optimizers.Optimizer) -> None:
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def train_step(self, real: tf.Tensor) -> dict[str, tf.Tensor]:
        noise = keras.random.normal((tf.shape(real)[0], LATENT))
        with tf.GradientTape(persistent=True) as tape:
            fake = self.generator(noise, training=True)
            real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
            d_loss = self.loss_fn(tf.ones_like(real_logits), real_logits) + self.loss_fn(
                tf.zeros_like(fake_logits), fake_logits
            )
            g_loss = self.loss_fn(tf.ones_like(fake_logits), fake_logits)
        if self.discriminator.trainable_variables:  # frozen while the generator is fine-tuned
            variables = self.discriminator.trainable_variables
            self.d_optimizer.apply(tape.gradient(d_loss, variables), variables)
        variables = self.generator.trainable_variables
        self.g_optimizer.apply(tape.gradient(g_loss, variables), variables)
        return {"d_loss": d_loss, "g_loss": g_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/gan")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    angle = np.random.default_rng(0).uniform(0, 2 * np.pi, 1024)
    circle = np.stack([np.cos(angle), np.sin(angle)], 1).astype("float32")
    gan = GAN()
    gan.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    watcher = normlog.keras.watch(gan, args.logdir, histogram_every=50)
    gan.fit(circle, batch_size=64, epochs=args.epochs, verbose=0, callbacks=[watcher])

    # Fine-tune the generator alone: freeze the discriminator and recompile. The same watcher
    # follows the new optimizers and trainable set; its steps continue.
    gan.discriminator.trainable = False
    gan.compile(keras.optimizers.Adam(1e-4), keras.optimizers.Adam(1e-4))
    gan.fit(circle, batch_size=64, epochs=1, verbose=0, callbacks=[watcher])
    print(f"steps logged: {watcher.step}")
    watcher.unwatch()
    print(f"logs written to {args.logdir}; view them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
