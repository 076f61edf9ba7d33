import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# every test app would otherwise listen for gRPC on 8001; the gRPC tests choose a free port
os.environ.setdefault("CAPSNET_GRPC_PORT", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real (seeded, tiny, untrained) CapsNet exported with `capsnet export`'s code."""
    from model_export.export import export
    from tests.factories import make_checkpoint, mnist_test_images

    d = tmp_path_factory.mktemp("tiny-model")
    make_checkpoint(d / "ckpt.pt")
    export(d / "ckpt.pt", d / "model", name="tiny", images=mnist_test_images(16), batches=(1, 7))
    return d / "model"
