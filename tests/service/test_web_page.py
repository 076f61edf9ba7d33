"""The web page at `/` in a real browser: headless Chromium (the Debian package, no browser download)
driven by Playwright, against the real service (uvicorn in a thread, the shipped model). It draws digits
with the mouse and with touch events, chooses a file, and checks what the page shows against what the API
answers for the same input.

`CAPSNET_SCREENSHOT=docs/web-page.png` (`make screenshot`) also writes the README's screenshot.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright

from capsnet.model_export.data import DATASETS
from capsnet.service.settings import SHIPPED_MODEL, Settings
from capsnet.service.web import STATIC_DIR
from tests import live
from tests.tools import installed_file

CHROMIUM = Path("/usr/bin/chromium")
KEY = "page-test-key"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@contextmanager
def serve(**settings: object) -> Iterator[str]:
    """The service on the shipped model until the block ends; yields its base URL."""
    with live.serve(Settings(model_dir=SHIPPED_MODEL, max_batch_size=8, **settings)) as host_port:
        yield f"http://{host_port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    installed_file(CHROMIUM, "Debian package chromium; make test installs it via scripts/system-deps.sh")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A fresh page on `url`; the returned list collects console errors, page errors and every request
    that left the service (the page must work offline)."""
    page = browser.new_page(viewport={"width": 1240, "height": 900})
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def request(req: Request) -> None:
        if not req.url.startswith((url, "blob:", "data:")):
            problems.append(f"request to {req.url}")

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", request)
    page.goto(url + "/")
    return page, problems


def draw(page: Page, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes on the pad, points in fractions of its size."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    for stroke in strokes:
        xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in stroke]
        page.mouse.move(*xy[0])
        page.mouse.down()
        for x, y in xy[1:]:
            page.mouse.move(x, y, steps=8)
        page.mouse.up()


def touch(page: Page, stroke: list[tuple[float, float]]) -> None:
    """One finger stroke on the pad, as a touch screen sends it (CDP touch events, not the mouse)."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    cdp = page.context.new_cdp_session(page)
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in stroke]
    (x0, y0), (x1, y1) = xy[0], xy[-1]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x0, "y": y0}]})
    for t in np.linspace(0, 1, 12)[1:]:
        point = {"x": x0 + t * (x1 - x0), "y": y0 + t * (y1 - y0)}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


SEVEN = [[(0.25, 0.22), (0.75, 0.22), (0.45, 0.82)]]
ONE = [[(0.52, 0.15), (0.48, 0.85)]]


def wait_analysed(page: Page, n: int) -> None:
    page.wait_for_function(
        f"() => document.body.dataset.analysed === '{n}' && "
        "document.getElementById('recon').dataset.pending === '0'",
        timeout=20_000,
    )


def bar_values(page: Page) -> np.ndarray:
    """The capsule lengths the bars show (each bar's data-value)."""
    return np.array(page.locator("#bars .bar").evaluate_all("bs => bs.map(b => Number(b.dataset.value))"))


def canvas_png(page: Page, selector: str) -> bytes:
    data_url = page.evaluate(f"document.querySelector('{selector}').toDataURL('image/png')")
    return base64.b64decode(data_url.split(",", 1)[1])


def recon_pixels(page: Page) -> np.ndarray:
    """The reconstruction canvas as shown: (28, 28) uint8 (it draws the 28x28 PNG 1:1, grey)."""
    rgba = np.asarray(Image.open(io.BytesIO(canvas_png(page, "#recon"))).convert("RGBA"))
    assert rgba.shape == (28, 28, 4)
    assert (rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 3] == 255).all()
    return rgba[..., 0].astype(int)


def heatmap_pixels(page: Page) -> np.ndarray:
    """The heatmap image the page shows, decoded by the browser: (H, W, 3) uint8."""
    data_url = page.evaluate(
        """() => {
            const img = document.getElementById('heatmap');
            const c = document.createElement('canvas');
            [c.width, c.height] = [img.naturalWidth, img.naturalHeight];
            c.getContext('2d').drawImage(img, 0, 0);
            return c.toDataURL('image/png');
        }"""
    )
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def routing_png(api: httpx.Client, image_png: bytes, weighted: bool = False, **model: str) -> np.ndarray:
    """/routing-trace?format=png of one image, decoded: (H, W, 3) uint8."""
    params = {"format": "png", "weighted": str(weighted).lower(), **model}
    r = api.post("/routing-trace", params=params, content=image_png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def decoded(api: httpx.Client, poses: np.ndarray, k: int, **model: str) -> np.ndarray:
    """The service's reconstruction of `poses` for class k, as the PNG's 0..255 values."""
    r = api.post("/reconstruct", params={"class_index": k, **model}, json={"poses": poses.tolist()})
    assert r.status_code == 200, r.text
    return np.clip(np.rint(np.asarray(r.json()["reconstruction"]) * 255), 0, 255).astype(int)


def test_page_draw_predict_reconstruct_route_and_edit_the_pose(browser: Browser, tmp_path: Path) -> None:
    with serve() as url, httpx.Client(base_url=url, timeout=30) as api:
        page, problems = open_page(browser, url)
        page.wait_for_function("() => document.querySelectorAll('#bars .col').length === 10")
        assert "capsnet-mnist" in page.locator("#model").inner_text()
        assert not page.locator("#key-form").is_visible()  # no key set: nothing to ask
        assert not page.locator("#model-pick").is_visible()  # one model: nothing to choose

        draw(page, SEVEN)
        wait_analysed(page, 1)

        # the numbers: the same drawing sent to /predict gives the bars' values and the predicted class
        drawing = canvas_png(page, "#pad")
        r = api.post("/predict", content=drawing, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        k = pred["class_index"]
        assert k == 7, pred["probabilities"]
        assert page.locator("#predicted").inner_text() == "7"
        bars = page.locator("#bars .bar")
        assert bars.count() == 10
        values = bar_values(page)
        np.testing.assert_allclose(values, pred["probabilities"], rtol=1e-12)
        assert ((values >= 0) & (values < 1)).all() and int(values.argmax()) == k
        heights = np.array(bars.evaluate_all(
            "bs => bs.map(b => b.offsetHeight / b.parentElement.offsetHeight)"
        ))  # fmt: skip
        np.testing.assert_allclose(heights, values, atol=0.01)  # the bars are drawn to scale
        assert page.locator("#bars .col.best").get_attribute("data-class") == "7"

        # the reconstruction shown is the decoder's picture of the predicted class's pose
        poses = np.asarray(pred["poses"])
        before = recon_pixels(page)
        np.testing.assert_allclose(before, decoded(api, poses, k), atol=1)
        assert 20 <= (before > 64).sum() <= 500, "a digit: neither blank nor filled"

        # the heatmaps shown are /routing-trace?format=png of the same drawing, and they are on screen
        np.testing.assert_array_equal(heatmap_pixels(page), routing_png(api, drawing))
        on_screen = np.asarray(Image.open(io.BytesIO(page.locator("#heatmap").screenshot())).convert("RGB"))
        assert on_screen.shape[1] >= 900, "shown nearly full width"
        coloured = (on_screen.max(axis=2) - on_screen.min(axis=2)) > 40
        assert coloured.mean() > 0.3, "the capsule tiles are there, in colour"
        assert len(np.unique(on_screen.reshape(-1, 3), axis=0)) > 50
        # the checkbox switches to the activation-weighted coupling, and back
        page.check("#weighted")
        page.wait_for_function("() => document.getElementById('heatmap').dataset.version === '2'")
        weighted = routing_png(api, drawing, weighted=True)
        assert not np.array_equal(weighted, routing_png(api, drawing))
        np.testing.assert_array_equal(heatmap_pixels(page), weighted)
        page.uncheck("#weighted")
        page.wait_for_function("() => document.getElementById('heatmap').dataset.version === '3'")
        np.testing.assert_array_equal(heatmap_pixels(page), routing_png(api, drawing))

        # moving a slider redraws the reconstruction from the edited pose
        slider = page.locator('#sliders input[data-dim="0"]')
        assert page.locator("#sliders input").count() == poses.shape[1] == 16
        version = int(page.locator("#recon").get_attribute("data-version") or 0)
        box = slider.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + 0.97 * box["width"], box["y"] + box["height"] / 2)
        page.wait_for_function(
            f"() => +document.getElementById('recon').dataset.version > {version} && "
            "document.getElementById('recon').dataset.pending === '0'"
        )
        offsets = np.array(page.locator("#sliders input").evaluate_all("xs => xs.map(x => Number(x.value))"))
        assert offsets[0] >= 0.2 and (offsets[1:] == 0).all()
        assert page.locator("#sliders output").first.inner_text() == f"+{offsets[0]:.2f}"
        after = recon_pixels(page)
        edited = poses.copy()
        edited[k] += offsets
        np.testing.assert_allclose(after, decoded(api, edited, k), atol=1)
        changed = np.abs(after - before)
        assert (changed > 16).sum() >= 10 and changed.mean() > 2, "the edit shows"

        shot = tmp_path / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if target := os.environ.get("CAPSNET_SCREENSHOT"):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Image.open(shot).save(target, optimize=True)  # ~150 KB
        assert problems == []


def test_page_picks_a_model_shows_its_classes_and_asks_it(browser: Browser, tiny_fashion_model_dir) -> None:
    """Two models served: the picker lists both, the default first and chosen; choosing the Fashion-MNIST
    one shows its class names and every call then names it."""
    clothes = list(DATASETS["fashion-mnist"].labels)
    with serve(model_dirs=str(tiny_fashion_model_dir)) as url, httpx.Client(base_url=url, timeout=30) as api:
        page, problems = open_page(browser, url)
        calls: list[str] = []
        page.on("request", lambda req: calls.append(req.url) if req.url.startswith(url) else None)
        page.wait_for_function("() => document.querySelectorAll('#model-picker option').length === 2")
        assert page.locator("#model-pick").is_visible()
        assert page.locator("#model-picker").input_value() == "capsnet-mnist"
        options = page.locator("#model-picker option").evaluate_all("os => os.map(o => o.value)")
        assert options == ["capsnet-mnist", "tiny-fashion"]
        draw(page, SEVEN)
        wait_analysed(page, 1)
        assert page.locator("#predicted").inner_text() == "7"
        asked = [c for c in calls if "/predict" in c or "/routing-trace" in c or "/reconstruct" in c]
        assert asked and all("model=capsnet-mnist" in c for c in asked), asked

        calls.clear()
        page.select_option("#model-picker", "tiny-fashion")
        page.wait_for_function("() => document.body.dataset.model === 'tiny-fashion'")
        wait_analysed(page, 3)  # the drawing again, now to the other model
        labels = page.locator("#bars .label").evaluate_all("ls => ls.map(l => l.textContent)")
        assert labels == clothes
        assert "tiny-fashion" in page.locator("#model").inner_text()
        assert "Fashion-MNIST form" in page.locator("#preprocess-note").inner_text()
        assert calls and all("model=tiny-fashion" in c for c in calls), calls

        drawing = canvas_png(page, "#pad")
        model = {"model": "tiny-fashion"}
        r = api.post("/predict", params=model, content=drawing, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert page.locator("#predicted").inner_text() == pred["label"] == clothes[pred["class_index"]]
        np.testing.assert_allclose(bar_values(page), pred["probabilities"], rtol=1e-12)
        np.testing.assert_allclose(
            recon_pixels(page), decoded(api, np.asarray(pred["poses"]), pred["class_index"], **model), atol=1
        )
        np.testing.assert_array_equal(heatmap_pixels(page), routing_png(api, drawing, **model))
        assert problems == []


def test_page_with_an_api_key_asks_for_it_and_sends_it_touch_and_file(browser: Browser) -> None:
    with serve(api_key=KEY) as url:
        assert httpx.get(url + "/").status_code == 200
        assert httpx.post(url + "/predict", content=b"x").status_code == 401
        page, problems = open_page(browser, url)
        page.wait_for_function("() => document.body.dataset.needsKey === '1'")
        assert page.locator("#key-form").is_visible()
        assert "API key" in page.locator("#status").inner_text()

        page.fill("#key", KEY)
        page.click("#key-form button")
        page.wait_for_function("() => document.body.dataset.needsKey === '0'")
        assert "capsnet-mnist" in page.locator("#model").inner_text()
        touch(page, ONE[0])
        wait_analysed(page, 1)
        assert page.locator("#predicted").inner_text() == "1"
        assert int(page.locator("#heatmap").get_attribute("data-version") or 0) == 1
        # a chosen file goes as it is (a JPEG scan here), with the key too
        page.set_input_files("#file", str(EXAMPLES / "3.jpg"))
        wait_analysed(page, 2)
        assert page.locator("#predicted").inner_text() == "3"
        assert int(page.locator("#heatmap").get_attribute("data-version") or 0) == 2
        # the 401s of the first /metadata call are the only console errors
        assert all("401" in p for p in problems) and len(problems) == 1, problems


def test_page_and_static_files_are_open_but_the_api_is_not() -> None:
    with live.ready_client(Settings(model_dir=SHIPPED_MODEL, max_batch_size=1, api_key=KEY)) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert '<canvas id="pad"' in r.text
        for name in ("app.js", "style.css"):
            r = c.get(f"/static/{name}")
            assert r.status_code == 200 and r.content == (STATIC_DIR / name).read_bytes()
        # the open prefix leads nowhere else: not out of static/, not to an API route
        for path in ("/static/nothing.js", "/static/%2e%2e/settings.py", "/static/..%2f..%2fpyproject.toml",
                     "/static/%2e%2e/metadata", "/static//etc/passwd"):  # fmt: skip
            assert c.get(path).status_code == 404, path
        assert c.get("/metadata").status_code == 401
        assert c.get("/metadata", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/index.html").status_code == 401  # only `/` itself is open, not every path
        assert "/" not in c.get("/openapi.json").json()["paths"]


def test_static_files_load_nothing_from_outside() -> None:
    """Offline: no CDN, no external font or script; everything is referenced from this origin."""
    files = sorted(STATIC_DIR.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "style.css"}
    external = [
        (f.name, m.group(0))
        for f in files
        for m in re.finditer(r"(https?:)?//[\w.-]+\.\w+|@import|@font-face", f.read_text())
    ]
    assert external == []
