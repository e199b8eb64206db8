"""normlog: per-layer values, L2 norms and histograms of weights and gradients, for TensorBoard.

Rules: `import normlog` imports numpy and nothing heavier; torch, TensorFlow, Keras,
tensorboardX and matplotlib load only when a Writer or an adapter needs them. The core
(`l2_norm`, `summarize`, `histogram`) is the reference every adapter must agree with.
"""

from normlog._core import Histogram, Stats, histogram, l2_norm, summarize
from normlog.writer import Writer

__all__ = ["Histogram", "Stats", "Writer", "histogram", "l2_norm", "summarize"]

__version__ = "0.1.0"
