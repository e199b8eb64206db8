import os
import sys

# TensorFlow's start-up chatter hides test output; oneDNN's reordering changes float sums.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

from tests import helpers

# tests/ is a package so that pytest puts the repository root, not tests/, on sys.path:
# with tests/ there, tests/torch and tests/keras (which mirror normlog's folders) would be
# importable as `torch` and `keras` wherever the real ones are not installed. Test modules
# import their helpers as `from helpers import ...`.
sys.modules.setdefault("helpers", helpers)

try:
    from hypothesis import settings
except ImportError:  # the property tests skip without hypothesis
    pass
else:
    # CI runs the same examples every time, so a run lands or fails on the code alone;
    # HYPOTHESIS_PROFILE=explore searches afresh, with many more examples.
    settings.register_profile("ci", max_examples=200, derandomize=True, database=None)
    settings.register_profile("explore", max_examples=5000)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
