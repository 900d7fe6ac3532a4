import os
from pathlib import Path

import dd  # noqa: F401  (applies the torchvision import shim before any test imports cleanfid/lpips)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
