import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Spawned ranks import the tests package; make it importable from the root.
os.environ.setdefault("PYTHONPATH", str(ROOT))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    import torch

    torch.manual_seed(0)
    yield
