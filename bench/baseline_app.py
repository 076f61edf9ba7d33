"""The baseline users would otherwise write: a plain FastAPI endpoint running the PyTorch CapsNet per
request. Weights are random (speed does not depend on their values); sizes are the paper's."""

from __future__ import annotations

import io

import numpy as np
import torch
from fastapi import Body, FastAPI
from PIL import Image

from capsnet.model_export.model import CapsNet

torch.manual_seed(0)
model = CapsNet().eval()
app = FastAPI()


@app.post("/predict")
def predict(body: bytes = Body(..., media_type="image/png")) -> dict[str, object]:
    img = np.asarray(Image.open(io.BytesIO(body)).convert("L"), dtype=np.float32) / 255.0
    with torch.inference_mode():
        lengths, poses, _ = model(torch.from_numpy(img)[None, None])
    c = int(lengths.argmax())
    return {"class_index": c, "probabilities": lengths[0].tolist(), "poses": poses[0].tolist()}


@app.get("/health/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}
