"""The README stays true to the code: every setting and every route is documented."""

from pathlib import Path

from service.app import create_app
from service.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_capsnet_setting_is_in_the_configuration_table():
    missing = [
        f"CAPSNET_{f.upper()}" for f in Settings.model_fields if f"`CAPSNET_{f.upper()}`" not in README
    ]
    assert not missing


def test_every_route_is_in_the_api_table():
    app = create_app(Settings())
    routes = set(app.openapi()["paths"])  # every documented route (included routers too)
    assert routes >= {"/predict", "/routing-trace", "/reconstruct", "/perturb", "/metrics"}
    assert [p for p in routes if f"`{p}`" not in README] == []
