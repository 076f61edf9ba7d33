"""Serving side: FastAPI + onnxruntime. Never imports torch or model_export."""

import os

# onnxruntime >= 1.31 sends usage telemetry from Linux unless told not to; a service should not.
# Set before any submodule imports onnxruntime; an operator's explicit value wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
