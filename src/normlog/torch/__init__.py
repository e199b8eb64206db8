"""PyTorch adapter: `normlog.watch(model)` logs per-parameter gradient and weight norms and histograms.

Rules: only this package imports torch. `_watcher` hooks the model and schedules steps,
`_reduce` starts a logged step's reductions and decodes them, `_engines` holds the
reductions themselves (torch ops, the compiled CPU kernel, `_triton` on CUDA), and
`_distributed` the ranks and FSDP2 shards. What a step writes is `normlog._step`'s.
"""

from normlog.torch._watcher import Watcher, unwatch, watch

__all__ = ["Watcher", "unwatch", "watch"]
