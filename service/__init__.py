"""Serving side: FastAPI + onnxruntime. Never imports torch or model_export."""
