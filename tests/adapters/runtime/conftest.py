"""The runtime's tests share tests/adapters' helpers (adapter_factory, layer_reference)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
