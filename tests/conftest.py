"""Shared test setup: tests run on CPU, deterministic, and use the checkout's packages."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402  (torch before decord, always)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
