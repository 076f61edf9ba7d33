"""What schemathesis sends as an image body: real images of any size, mode and format the service
decodes, and junk. Imported by test_fuzz.py, and by the `st` command as its hooks module
(SCHEMATHESIS_HOOKS=tests.service.fuzz_media), so both fuzz the same bodies."""

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def image_files(draw) -> bytes:
    """Real images of any size, mode and format the service decodes, with random content."""
    h, w = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError):  # a mode this format cannot store (e.g. 16-bit as BMP)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return buf.getvalue()


BODIES = st.one_of(image_files(), st.binary(max_size=2048))  # decodable images and junk
for media in ("image/png", "image/jpeg", "application/octet-stream"):
    schemathesis.openapi.media_type(media, BODIES)
