"""What pyproject.toml cannot say: which packages the wheel holds, and the shipped model in it.

Everything installs under the one top-level package `capsnet` (capsnet.service, capsnet.model_export,
capsnet.models): no generic top-level name such as `service` for pip to overwrite. bench/ is a tool of
the checkout (it reads models/, docs/ and git) and stays out of the wheel: `python -m bench`.

The models are stored once, under models/ (the Dockerfile, the deploy manifests and the docs name that
path). The wheel carries them as the data package `capsnet.models` (this directory mapped to that name),
found at run time with importlib.resources: see capsnet.service.settings.SHIPPED_MODEL and
shipped_models().

A tree without models/ builds a wheel without the model, with a warning: the container build copies
only the code into its build stage and the model beside it (/app/models, CAPSNET_MODEL_DIR), so the
image holds it once. Every other build (`python -m build`, `pip install .`, `pip install -e .`) has it,
and scripts/check-wheel.sh checks that the wheel really does.
"""

import warnings
from pathlib import Path

from setuptools import find_packages, setup

MODELS = Path(__file__).resolve().parent / "models"
# capsnet-int8.onnx: what CAPSNET_PRECISION=int8 serves (CPU-only hosts); fp16 is written on demand
SHIPPED_FILES = ["capsnet.onnx", "capsnet-int8.onnx", "decoder.onnx", "model_card.json", "MODEL_CARD.md",
                 "export.json"]  # fmt: skip

packages = find_packages(include=["capsnet", "capsnet.*"])
package_dir: dict[str, str] = {}
package_data = {"capsnet.service": ["static/*"]}
if (MODELS / "__init__.py").is_file():
    packages.append("capsnet.models")
    package_dir["capsnet.models"] = "models"
    # Every shipped model (a folder with a capsnet.onnx: the service serves them all, capsnet-mnist the
    # default), its files by name: a capsnet-fp16.onnx or a Triton repository written beside them stays out.
    shipped = sorted(d.name for d in MODELS.iterdir() if (d / "capsnet.onnx").is_file())
    package_data["capsnet.models"] = [f"{d}/{name}" for d in shipped for name in SHIPPED_FILES]
else:
    warnings.warn("models/ is absent: this wheel carries no model (set CAPSNET_MODEL_DIR)", stacklevel=1)

setup(packages=packages, package_dir=package_dir, package_data=package_data)
