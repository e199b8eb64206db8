"""Overhead of normlog.watch per training step, against plain training and the usual tutorial loop.

Every mode trains its own copy of the same model on the same batch; the modes are
interleaved round by round in one process, so drift in machine load hits them alike.
Prints median step times and ratios to plain training; an unwatched second copy of the
plain model shows how far two identical runs differ on this machine.

    python benchmarks/bench_torch.py             # CPU config: ~7.4M-parameter LM, 53 tensors
    python benchmarks/bench_torch.py --gpu --rounds 10 --tutorial-steps 1   # GPT-2-sized LM, bf16 autocast, fused AdamW
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import normlog
import normlog.health
import normlog.torch


class LM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.body(self.embed(tokens) + self.position, mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


def make(gpu: bool) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    vocab, dim, layers, heads, context, batch = (50257, 768, 12, 12, 512, 8) if gpu else (8192, 256, 4, 4, 128, 4)
    device = "cuda" if gpu else "cpu"
    model = LM(vocab, dim, layers, heads, context).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    tokens = torch.randint(0, vocab, (batch, context), device=device)
    return model, optimizer, tokens


def step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, gpu: bool) -> None:
    with torch.autocast("cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=gpu):
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def tutorial_loop(model: nn.Module, logdir: str) -> Callable[[int], None]:
    """What the tutorials teach: tensorboardX add_histogram of every gradient and weight."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir)

    def log(i: int) -> None:
        for name, p in model.named_parameters():
            writer.add_histogram(f"{name}/grad", p.grad.float().cpu().numpy(), i)
            writer.add_histogram(name, p.detach().float().cpu().numpy(), i)
            writer.add_scalar(f"{name}/grad_norm", p.grad.norm().item(), i)

    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    parser.add_argument(
        "--tutorial-steps",
        type=int,
        help="timed steps per round of the tutorial loop (default: --steps); "
        "at over 100x plain on a GPU, a few samples place it",
    )
    args = parser.parse_args()
    # the health rules run (their cost is part of watching), but their findings on this
    # random-data model would only clutter the tables
    warnings.simplefilter("ignore", normlog.health.HealthWarning)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    root = tempfile.mkdtemp(prefix="normlog-bench-")

    modes: dict[str, tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, Callable[[int], None]]] = {}
    watchers: dict[str, normlog.torch.Watcher] = {}
    # "plain, second copy" trains an unwatched twin: its ratio is the noise floor of the run.
    for mode in (
        "plain",
        "plain, second copy",
        "watch all, histograms every step",
        "norms only, every step",
        "watch defaults",
        "defaults + ring of 5",
        "tutorial loop",
    ):
        model, optimizer, tokens = make(args.gpu)
        extra: Callable[[int], None] = lambda i: None
        logdir = f"{root}/{len(modes)}"
        if mode == "watch all, histograms every step":
            watchers[mode] = normlog.watch(model, logdir, optimizer=optimizer, every=1, histogram_every=1)
        elif mode == "norms only, every step":
            watchers[mode] = normlog.watch(model, logdir, optimizer=optimizer, every=1, histogram_every=None)
        elif mode == "watch defaults":
            watchers[mode] = normlog.watch(model, logdir, optimizer=optimizer)
        elif mode == "defaults + ring of 5":
            # histograms_before_finding: every logged step computes its rows and keeps them on
            # the device; the host gets only the norms (a healthy run's ring is never written)
            watchers[mode] = normlog.watch(model, logdir, optimizer=optimizer, histograms_before_finding=5)
        elif mode == "tutorial loop":
            extra = tutorial_loop(model, logdir)
        modes[mode] = (model, optimizer, tokens, extra)

    times: dict[str, list[float]] = {mode: [] for mode in modes}
    counters = dict.fromkeys(modes, 0)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = list(modes.items())  # each round starts at another mode: no mode always goes first
        for mode, (model, optimizer, tokens, extra) in order[round_ % len(order) :] + order[: round_ % len(order)]:
            for _ in range(args.tutorial_steps or args.steps if mode == "tutorial loop" else args.steps):
                sync()
                start = time.perf_counter()
                step(model, optimizer, tokens, args.gpu)
                extra(counters[mode])
                sync()
                counters[mode] += 1
                if round_:
                    times[mode].append(time.perf_counter() - start)

    parameters = sum(p.numel() for p in modes["plain"][0].parameters())
    tensors = len(list(modes["plain"][0].parameters()))
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'GPU' if args.gpu else 'CPU'} config: {parameters / 1e6:.1f}M parameters in {tensors} tensors; {device}")
    print(f"median of {args.rounds * args.steps} steps per mode, interleaved over {args.rounds} rounds", end="")
    print(f" ({args.rounds * args.tutorial_steps} for the tutorial loop)\n" if args.tutorial_steps else "\n")
    plain = statistics.median(times["plain"])
    print("| mode | step (ms) | vs plain |\n| --- | ---: | ---: |")
    for mode, samples in times.items():
        median = statistics.median(samples)
        print(f"| {mode} | {median * 1e3:.1f} | {median / plain:.2f}x |")

    # Step-time ratios of a few percent drown in the machine's noise (see the second copy),
    # so also time a logged step's own work alone: reduce on the device, transfer, write.
    # "on the training thread" is the host time of the hooks' calls; the rest is waiting for
    # the device and, on a GPU, for the background thread's writing. "reductions" ends when
    # the reducing calls return (on a GPU, once launched); "transfer, writing" is the rest.
    print(
        "\n| logging work of one logged step, timed alone | ms | share of a plain step "
        "| on the training thread (ms) | reductions (ms) | transfer, writing (ms) |"
        "\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for mode, watcher in watchers.items():
        if watcher._due(
            watcher._histogram_every
        ):  # time the ordinary step, not a histogram step that default cadences skip
            watcher.step += 1
        samples: dict[str, list[float]] = {"total": [], "hooks": [], "reductions": [], "writing": []}
        for _ in range(args.rounds * args.steps):
            sync()
            start = time.perf_counter()
            pending = watcher._reduce()
            reduced = time.perf_counter()
            watcher._finish(pending)  # type: ignore[arg-type]
            samples["hooks"].append(time.perf_counter() - start)
            watcher._wait_for_writing()  # on a GPU, the writing runs on a background thread
            sync()
            samples["total"].append(time.perf_counter() - start)
            samples["reductions"].append(reduced - start)
            samples["writing"].append(samples["total"][-1] - samples["reductions"][-1])
        total, hooks, reductions, writing = (statistics.median(samples[key]) * 1e3 for key in samples)
        print(f"| {mode} | {total:.1f} | {total / plain / 1e3:.1%} | {hooks:.1f} | {reductions:.1f} | {writing:.1f} |")


if __name__ == "__main__":
    main()
