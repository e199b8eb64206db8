"""The runs of the findings benchmark: small PyTorch trainings on the CPU, healthy and broken.

Rules: each scenario trains as people train (their optimizers, schedules, clipping,
normalisation layers), knows nothing of normlog's rules, and records what a logged step
holds with plain torch (`Recorder`), not with `normlog.watch`. A broken scenario declares
each problem it injects: the rule that should find it, the tensors (fnmatch patterns, or
any) and the step of its cause.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

STEPS = 300  # logged steps per run; every step is logged


@dataclass(frozen=True)
class Problem:
    """An injected problem. `required`: it must be found (recall); an optional one is a
    consequence that may or may not follow (e.g. NaN after a blow-up), so a finding of it is
    no false alarm, and not finding it is no miss."""

    rule: str
    step: int
    tensors: tuple[str, ...] = ()  # fnmatch patterns; () = any tensor
    required: bool = True


@dataclass
class Trace:
    """Per logged step and tensor (model order), what the adapters record."""

    names: list[str]
    ndims: list[int]
    owned: list[bool]  # in one of the optimizer's parameter groups
    grad_norm: np.ndarray  # [steps, tensors], NaN where `has_grad` is False
    has_grad: np.ndarray
    weight_norm: np.ndarray  # of the weights the step's gradients were computed from
    update_ratio: np.ndarray  # ‖Δw‖/‖w‖ of the step's optimizer update
    grad_nonfinite: np.ndarray
    weight_nonfinite: np.ndarray
    global_norm: np.ndarray  # [steps], before any clipping


class Recorder:
    """Measures a step with torch directly: call `gradients()` after `backward()` (before any
    clipping) and `updated()` after `optimizer.step()`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.params = list(model.named_parameters())
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.names = [name for name, _ in self.params]
        self.ndims = [p.ndim for _, p in self.params]
        self.owned = [id(p) in owned for _, p in self.params]
        self.rows: dict[str, list[list[float]]] = {key: [] for key in _FIELDS}
        self.global_norms: list[float] = []
        self._before: list[torch.Tensor] = []

    @torch.no_grad()
    def gradients(self) -> None:
        grads, has, weights, gbad, wbad = [], [], [], [], []
        squares = 0.0
        for _, p in self.params:
            if p.grad is None:
                grads.append(math.nan), has.append(0.0), gbad.append(0.0)
            else:
                norm = float(p.grad.double().norm())
                grads.append(norm), has.append(1.0)
                gbad.append(float((~torch.isfinite(p.grad)).sum()))
                squares += norm * norm
            weights.append(float(p.double().norm()))
            wbad.append(float((~torch.isfinite(p)).sum()))
        self._before = [p.detach().clone() for _, p in self.params]
        for key, row in zip(_FIELDS[:5], (grads, has, weights, gbad, wbad)):
            self.rows[key].append(row)
        self.global_norms.append(math.sqrt(squares))

    @torch.no_grad()
    def updated(self) -> None:
        ratios = []
        for (_, p), before in zip(self.params, self._before):
            weight = float(before.double().norm())
            update = float((p.double() - before.double()).norm())
            ratios.append(update / weight if weight else math.inf)
        self.rows["update_ratio"].append(ratios)

    def trace(self) -> Trace:
        arrays = {key: np.asarray(rows, dtype=np.float64) for key, rows in self.rows.items()}
        return Trace(
            names=self.names,
            ndims=self.ndims,
            owned=self.owned,
            grad_norm=arrays["grad_norm"],
            has_grad=arrays["has_grad"] > 0,
            weight_norm=arrays["weight_norm"],
            update_ratio=arrays["update_ratio"],
            grad_nonfinite=arrays["grad_nonfinite"],
            weight_nonfinite=arrays["weight_nonfinite"],
            global_norm=np.asarray(self.global_norms),
        )


_FIELDS = ("grad_norm", "has_grad", "weight_norm", "grad_nonfinite", "weight_nonfinite", "update_ratio")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, ...]],
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...], int], torch.Tensor],
    *,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip: float | None = None,
    before_step: Callable[[int], None] | None = None,
    steps: int = STEPS,
) -> Trace:
    """The usual loop: forward, backward, (clip), step, (schedule); measured every step."""
    recorder = Recorder(model, optimizer)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch, step).backward()
        recorder.gradients()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        recorder.updated()
        if schedule is not None:
            schedule.step()
    return recorder.trace()


# -- data --------------------------------------------------------------------------------


def blobs(seed: int, classes: int = 10, dim: int = 20, batch: int = 64) -> Iterator[tuple[torch.Tensor, ...]]:
    """Gaussian clusters, one per class, overlapping a little."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 1.5
    while True:
        y = torch.randint(classes, (batch,), generator=g)
        yield centres[y] + torch.randn(batch, dim, generator=g), y


def teacher(seed: int, dim: int = 16, batch: int = 32, noise: float = 0.1) -> Iterator[tuple[torch.Tensor, ...]]:
    """Regression onto a random two-layer tanh network."""
    g = torch.Generator().manual_seed(seed + 1000)
    w1, w2 = torch.randn(dim, 32, generator=g) / dim**0.5, torch.randn(32, 1, generator=g) / 32**0.5
    while True:
        x = torch.randn(batch, dim, generator=g)
        yield x, torch.tanh(x @ w1) @ w2 + noise * torch.randn(batch, 1, generator=g)


def bars(seed: int, batch: int = 32, size: int = 16) -> Iterator[tuple[torch.Tensor, ...]]:
    """Images of a bar in one of four orientations, at a random place, in noise."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(size, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    while True:
        y = torch.randint(4, (batch,), generator=g)
        offset = torch.randint(-4, 5, (batch, 1, 1), generator=g).float()
        centre = size / 2 + offset
        distance = torch.stack([rows - centre, cols - centre, rows - cols - offset, rows + cols - size - offset], 1)
        distance = distance[torch.arange(batch), y]
        image = torch.exp(-(distance**2) / 2) + 0.3 * torch.randn(batch, size, size, generator=g)
        yield image.unsqueeze(1), y


def progressions(seed: int, batch: int = 32, length: int = 16, vocab: int = 17) -> Iterator[tuple[torch.Tensor, ...]]:
    """Token sequences x_i = (a + b*i) mod (vocab - 1): a language model learns b from the start."""
    g = torch.Generator().manual_seed(seed)
    while True:
        a = torch.randint(vocab - 1, (batch, 1), generator=g)
        b = torch.randint(1, 4, (batch, 1), generator=g)
        yield ((a + b * torch.arange(length + 1)) % (vocab - 1),)


def separable(seed: int, dim: int = 20, batch: int = 64) -> Iterator[tuple[torch.Tensor, ...]]:
    """Two classes a hyperplane separates with a margin."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(dim, generator=g)
    normal /= normal.norm()
    while True:
        x = torch.randn(batch, dim, generator=g)
        side = (x @ normal > 0).float()
        yield x + (2 * side - 1).unsqueeze(1) * 0.5 * normal, side.unsqueeze(1)


def noisy_binary(seed: int, dim: int = 20, batch: int = 64) -> Iterator[tuple[torch.Tensor, ...]]:
    """Two classes by a hyperplane, with one label in five flipped: logits stay moderate."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(dim, generator=g)
    while True:
        x = torch.randn(batch, dim, generator=g)
        flip = torch.rand(batch, generator=g) < 0.2
        yield x, ((x @ normal > 0) ^ flip).float().unsqueeze(1)


def sequences(
    seed: int, batch: int = 32, length: Callable[[int], int] = lambda step: 20
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Noise sequences whose label is the sign of the sum of their first two entries."""
    g = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        x = torch.randn(batch, length(step), 1, generator=g)
        yield x, (x[:, 0, 0] + x[:, 1, 0] > 0).long()
        step += 1


def mlp(
    sizes: list[int], activation: type[nn.Module] = nn.ReLU, norm: bool = False, dropout: float = 0.0
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if norm:
                layers.append(nn.LayerNorm(b))
            layers.append(activation())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def mse(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


# -- healthy runs ------------------------------------------------------------------------


def mlp_adam(seed: int) -> Trace:
    model = mlp([20, 64, 64, 10])
    return train(model, torch.optim.Adam(model.parameters(), 1e-3), blobs(seed), cross_entropy)


def mlp_sgd_regression(seed: int) -> Trace:
    model = mlp([16, 64, 64, 1], nn.Tanh)
    return train(model, torch.optim.SGD(model.parameters(), 0.05), teacher(seed), mse)


def small_batch_sgd(seed: int) -> Trace:
    model = mlp([20, 32, 32, 10])
    return train(model, torch.optim.SGD(model.parameters(), 0.02), blobs(seed, batch=4), cross_entropy)


def mlp_dropout_onecycle(seed: int) -> Trace:
    model = mlp([20, 128, 128, 10], dropout=0.2)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=STEPS)
    return train(model, optimizer, blobs(seed), cross_entropy, schedule=schedule)


def layernorm_adamw(seed: int) -> Trace:
    model = mlp([20, 64, 64, 64, 10], nn.GELU, norm=True)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.1)
    return train(model, optimizer, blobs(seed), cross_entropy)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def cnn_momentum_step_decay(seed: int) -> Trace:
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 100, gamma=0.1)
    return train(model, optimizer, bars(seed), cross_entropy, schedule=schedule)


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm Transformer blocks with a causal mask, a final
    LayerNorm and a head tied to nothing; GPT-2's 0.02 initialisation."""

    def __init__(self, vocab: int = 17, width: int = 32, depth: int = 2, length: int = 16) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions[: x.shape[1]]
        return self.head(self.norm(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)))


def language_model(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
    (tokens,) = batch
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def gpt_adamw_cosine_clip(seed: int) -> Trace:
    model = TinyGPT()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], 3e-3, betas=(0.9, 0.95)
    )
    schedule = warmup_cosine(optimizer, 30, STEPS)
    return train(model, optimizer, progressions(seed), language_model, schedule=schedule, clip=1.0)


class Bandit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.policy = mlp([8, 32, 4], nn.Tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.policy(x)


def reinforce_bandit(seed: int) -> Trace:
    """A contextual bandit, REINFORCE with a running-mean baseline: noisy, spiky gradients."""
    model = Bandit()
    g = torch.Generator().manual_seed(seed)
    arms = torch.randn(8, 4, generator=g)
    baseline = [0.0]

    def contexts() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield (torch.randn(16, 8, generator=g),)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        (x,) = batch
        distribution = torch.distributions.Categorical(logits=model(x))
        action = distribution.sample()
        reward = torch.bernoulli(torch.sigmoid(2 * (x @ arms)[torch.arange(16), action]), generator=g)
        advantage = reward - baseline[0]
        baseline[0] = 0.9 * baseline[0] + 0.1 * float(reward.mean())
        return -(advantage * distribution.log_prob(action)).mean()

    return train(model, torch.optim.Adam(model.parameters(), 1e-2), contexts(), loss)


def frozen_backbone(seed: int) -> Trace:
    """Fine-tuning a head on a frozen feature extractor."""
    model = nn.Sequential(mlp([20, 64, 64]), nn.ReLU(), nn.Linear(64, 10))
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    return train(model, optimizer, blobs(seed), cross_entropy)


class WithUnusedParts(nn.Module):
    """A pretrained embedding left out of the optimizer (but not marked frozen), and an
    auxiliary head that this training never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = nn.Embedding(50, 16)
        self.features = nn.Linear(20, 16)
        self.body = mlp([32, 64, 10])
        self.auxiliary = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, :4].abs() * 10).long().clamp(max=49)
        return self.body(torch.cat([self.pretrained(ids).mean(1), self.features(x)], 1))


def unused_and_excluded(seed: int) -> Trace:
    model = WithUnusedParts()
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("pretrained")], 1e-3)
    return train(model, optimizer, blobs(seed), cross_entropy)


class ResidualBN(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(20, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width)) for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def residual_batchnorm_nesterov(seed: int) -> Trace:
    model = ResidualBN()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return train(model, optimizer, blobs(seed), cross_entropy)


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, 32, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def gru_adam_clip(seed: int) -> Trace:
    model = GRUClassifier()
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    return train(model, optimizer, sequences(seed), cross_entropy, clip=1.0)


def binary(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])


def logistic_separable(seed: int) -> Trace:
    """Logistic regression on separable data: the weight norm grows like log(t), by design."""
    model = nn.Linear(20, 1)
    return train(model, torch.optim.SGD(model.parameters(), 0.5), separable(seed), binary)


class ConvAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def conv_autoencoder(seed: int) -> Trace:
    model = ConvAutoencoder()

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        target = torch.sigmoid(batch[0])
        return nn.functional.mse_loss(model(target), target)

    return train(model, torch.optim.Adam(model.parameters(), 1e-3), bars(seed), loss)


def zero_init_head(seed: int) -> Trace:
    """A zero-initialised output layer (as in ReZero or many RL heads): the layers before it
    get exactly zero gradient at the first step."""
    model = mlp([20, 64, 64, 10])
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    return train(model, torch.optim.Adam(model.parameters(), 1e-3), blobs(seed), cross_entropy)


# -- broken runs -------------------------------------------------------------------------


def lr_too_high(seed: int) -> Trace:
    """Plain SGD at lr 2 on a regression: the loss diverges within a few steps."""
    model = mlp([16, 64, 64, 1])
    return train(model, torch.optim.SGD(model.parameters(), 2.0), teacher(seed), mse)


def lr_milestone_bug(seed: int) -> Trace:
    """MultiStepLR with gamma=100 where 0.01 was meant: the learning rate jumps at step 150."""
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [150], gamma=100.0)
    return train(model, optimizer, bars(seed), cross_entropy, schedule=schedule)


def corrupted_batch(seed: int) -> Trace:
    """One batch at step 180 from a bad shard: features in the wrong units (x1000) and labels
    out of step with them."""
    model = mlp([20, 64, 64, 10])
    source = blobs(seed)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        for step, (x, y) in enumerate(source):
            yield (x * 1000, y.roll(1)) if step == 180 else (x, y)

    return train(model, torch.optim.Adam(model.parameters(), 1e-3), batches(), cross_entropy)


def deep_sigmoid(seed: int) -> Trace:
    model = mlp([20] + [32] * 10 + [10], nn.Sigmoid)
    return train(model, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), blobs(seed), cross_entropy)


def deep_tanh_small_init(seed: int) -> Trace:
    model = mlp([20] + [64] * 8 + [10], nn.Tanh)
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.05)
    return train(model, torch.optim.Adam(model.parameters(), 1e-4), blobs(seed), cross_entropy)


def dead_relu(seed: int) -> Trace:
    """A hidden layer whose bias starts at -10: its ReLUs never fire."""
    model = mlp([20, 64, 64, 64, 10])
    nn.init.constant_(model[2].bias, -10.0)
    return train(model, torch.optim.Adam(model.parameters(), 1e-3), blobs(seed), cross_entropy)


def nan_from_log0(seed: int) -> Trace:
    """A hand-written binary cross-entropy on noisy labels: at step 150 one sample's features
    come 10^4 too large, its sigmoid saturates to exactly 0 or 1 in float32, and the loss
    takes log(0)."""
    model = mlp([20, 64, 64, 1])
    source = noisy_binary(seed)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        for step, (x, y) in enumerate(source):
            if step == 150:
                x = x.clone()
                x[0] *= 1e4
            yield x, y

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        x, y = batch
        p = torch.sigmoid(model(x))
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()

    return train(model, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), batches(), loss)


class Standardise(nn.Module):
    """Per-batch standardisation written by hand: x / std, with no epsilon."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / x.std(0)


def nan_from_zero_variance(seed: int) -> Trace:
    """At step 200 a sensor is stuck: one feature is constant in a batch, its std is 0."""
    model = nn.Sequential(Standardise(), mlp([20, 64, 64, 10]))
    source = blobs(seed)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        for step, (x, y) in enumerate(source):
            if step == 200:
                x = x.clone()
                x[:, 3] = 1.0
            yield x, y

    return train(model, torch.optim.Adam(model.parameters(), 1e-3), batches(), cross_entropy)


def nan_weight(seed: int) -> Trace:
    """A custom op writes a NaN into one weight before step 120 (as a bad checkpoint would)."""
    model = mlp([20, 64, 64, 10])

    def poison(step: int) -> None:
        if step == 120:
            with torch.no_grad():
                model[2].weight[5, 7] = math.nan

    optimizer = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    return train(model, optimizer, blobs(seed), cross_entropy, before_step=poison)


def stalled_group(seed: int) -> Trace:
    """A parameter group for the head at lr 1e-12 (a typo for 1e-2?)."""
    model = mlp([20, 64, 64, 10])
    optimizer = torch.optim.Adam(
        [{"params": model[:-1].parameters()}, {"params": model[-1].parameters(), "lr": 1e-12}], 1e-3
    )
    return train(model, optimizer, blobs(seed), cross_entropy)


def growing_weights(seed: int) -> Trace:
    """A sign error turns the loss into an unbounded score (mean true-class logit), with no
    weight decay: the weights grow without end."""
    model = mlp([20, 64, 64, 10])

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits, y) - logits.gather(1, y[:, None]).mean()

    return train(model, torch.optim.Adam(model.parameters(), 1e-3), blobs(seed), loss)


class IRNN(nn.Module):
    """A ReLU RNN with identity recurrent initialisation (Le et al., 2015)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, 32, nonlinearity="relu", batch_first=True)
        nn.init.eye_(self.rnn.weight_hh_l0)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def exploding_rnn(seed: int) -> Trace:
    """A curriculum that lengthens the sequences from 10 to 100 steps at step 150, without
    gradient clipping."""
    model = IRNN()
    data = sequences(seed, length=lambda step: 10 if step < 150 else 100)
    return train(model, torch.optim.SGD(model.parameters(), 0.01, momentum=0.9), data, cross_entropy)


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[int], Trace]
    problems: tuple[Problem, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        return not self.problems


ANY = ()
SCENARIOS = (
    Scenario("mlp_adam", mlp_adam),
    Scenario("mlp_sgd_regression", mlp_sgd_regression),
    Scenario("small_batch_sgd", small_batch_sgd),
    Scenario("mlp_dropout_onecycle", mlp_dropout_onecycle),
    Scenario("layernorm_adamw", layernorm_adamw),
    Scenario("cnn_momentum_step_decay", cnn_momentum_step_decay),
    Scenario("gpt_adamw_cosine_clip", gpt_adamw_cosine_clip),
    Scenario("reinforce_bandit", reinforce_bandit),
    Scenario("frozen_backbone", frozen_backbone),
    Scenario("unused_and_excluded", unused_and_excluded),
    Scenario("residual_batchnorm_nesterov", residual_batchnorm_nesterov),
    Scenario("gru_adam_clip", gru_adam_clip),
    Scenario("logistic_separable", logistic_separable),
    Scenario("conv_autoencoder", conv_autoencoder),
    Scenario("zero_init_head", zero_init_head),
    Scenario("lr_too_high", lr_too_high, (Problem("exploding", 0), Problem("nonfinite", 0, required=False))),
    Scenario(
        "lr_milestone_bug", lr_milestone_bug, (Problem("exploding", 150), Problem("nonfinite", 150, required=False))
    ),
    Scenario("corrupted_batch", corrupted_batch, (Problem("exploding", 180),)),
    Scenario("deep_sigmoid", deep_sigmoid, (Problem("vanishing", 0, ("0.*", "2.*", "4.*")),)),
    Scenario("deep_tanh_small_init", deep_tanh_small_init, (Problem("vanishing", 0, ("0.*", "2.*", "4.*")),)),
    Scenario("dead_relu", dead_relu, (Problem("dead", 0, ("0.*", "2.*", "4.weight")),)),
    Scenario("nan_from_log0", nan_from_log0, (Problem("nonfinite", 150),)),
    Scenario("nan_from_zero_variance", nan_from_zero_variance, (Problem("nonfinite", 200),)),
    Scenario("nan_weight", nan_weight, (Problem("nonfinite", 120),)),
    Scenario("stalled_group", stalled_group, (Problem("stalled", 0, ("4.*",)),)),
    Scenario("growing_weights", growing_weights, (Problem("diverging", 0),)),
    Scenario("exploding_rnn", exploding_rnn, (Problem("exploding", 150), Problem("nonfinite", 150, required=False))),
)
SEEDS = (0, 1, 2)
