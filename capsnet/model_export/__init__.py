"""Training side of the CapsNet service: model, data, training loop and ONNX export (needs torch)."""
