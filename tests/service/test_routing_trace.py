"""/routing-trace on the shipped model, where routing visibly moves the coupling (examples/7.png: c_i7 goes
from 0.1 to 0.074-0.820), so its numbers can be told right from wrong.

Every number is checked against onnxruntime's raw outputs for the same input and against plain numpy
written here (not the service's helpers), every iteration, both entropies, both aggregations. Each check
also computes the wrong answers that plausible bugs give (iterations reversed, the last routing update
skipped, the coupling transposed, the wrong axis averaged, an unweighted mass) and asserts that its
tolerance rejects them by a wide margin: a check that would pass them could not fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from capsnet.service.preprocess import preprocess_bytes
from capsnet.service.settings import SHIPPED_MODEL, Settings
from tests.checks import assert_right_not_wrong, skip_last_update, transposed
from tests.factories import mnist_test_images
from tests.live import ready_client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in {".png", ".jpg"})
API_DOC = (ROOT / "docs" / "api.md").read_text()  # its routing figures for examples/7.png
TYPES, GRID = 32, 6
# The service and the reference run the same ONNX file on the same input at batch 1; what differs is
# float32 against float64 arithmetic in the summaries, about 1e-7 relative: checks.assert_right_not_wrong's
# default rtol of 1e-5.


@pytest.fixture(scope="module")
def client():
    with ready_client(Settings(model_dir=SHIPPED_MODEL)) as c:
        yield c


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(SHIPPED_MODEL / "capsnet.onnx"), providers=["CPUExecutionProvider"])


def post_image(client, path: Path, query: str = ""):
    ctype = "image/png" if path.suffix == ".png" else "image/jpeg"
    r = client.post(f"/routing-trace{query}", content=path.read_bytes(), headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    return r.json()


def reference(session, path: Path) -> dict[str, np.ndarray]:
    """onnxruntime's outputs for the image as the service preprocesses it, batch 1, first item."""
    x = preprocess_bytes(path.read_bytes(), mode="mnist", max_pixels=10**7)[None, None].astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    return {n: v[0] for n, v in zip(names, session.run(None, {"image": x}), strict=True)}


def summary(c: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Per iteration [class_mass (J), mean_entropy, weighted_entropy], float64, from docs/api.md's
    definitions: mass_j = Σ_i a_i c_ij / Σ_i a_i; H_i = -Σ_j c_ij ln c_ij, its mean and a-weighted mean."""
    c, a = c.astype(np.float64), a.astype(np.float64)
    w = a / a.sum()
    rows = []
    for k in range(c.shape[0]):
        h = -(c[k] * np.log(c[k])).sum(axis=1)  # (N,)
        rows.append([*(w @ c[k]), h.mean(), h @ w])
    return np.array(rows)


def served_summary(t: dict) -> np.ndarray:
    return np.array([[*s["class_mass"], s["mean_entropy"], s["weighted_entropy"]] for s in t["summary"]])


@pytest.fixture(scope="module")
def traces(client, session):
    """name -> (trace JSON, onnxruntime reference) for every examples/ image."""
    return {p.name: (post_image(client, p), reference(session, p)) for p in EXAMPLES}


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_coupling_of_every_iteration_is_onnxruntimes(traces, name):
    t, ref = traces[name]
    want = ref["coupling"]  # (3, 1152, 10)
    assert t["iterations"] == 3 and t["coupling_iterations"] == [1, 2, 3]
    assert t["primary_capsules"] == {
        "count": 1152,
        "types": 32,
        "grid": [6, 6],
        "order": ["type", "row", "col"],
    }
    c = np.array(t["coupling"])
    assert c.shape == want.shape
    np.testing.assert_allclose(c[0], 0.1, rtol=1e-6)  # b = 0: the first iteration is uniform
    assert np.abs(c[2] - c[1]).max() > 0.05  # routing moves single capsules a long way
    wrong = {
        "iterations reversed": want[::-1],
        "the last routing update skipped": skip_last_update(want),
        "coupling transposed": transposed(want),
        "the first iteration repeated": np.repeat(want[:1], 3, axis=0),
    }
    assert_right_not_wrong(c, want, wrong)
    # The prediction beside it is the one the last iteration produced.
    probs = ref["probabilities"]
    assert t["class_index"] == int(probs.argmax()) and t["label"] == name[0]
    assert_right_not_wrong(t["probabilities"], probs, {"zeros": np.zeros_like(probs)})
    assert_right_not_wrong(t["poses"], ref["poses"], {"poses negated": -ref["poses"]})
    a = ref["primary_activations"]
    assert_right_not_wrong(t["primary_activations"], a, {"activations reversed": a[::-1]})


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_summary_of_every_iteration_equals_numpy(traces, name):
    t, ref = traces[name]
    c, a = ref["coupling"], ref["primary_activations"]
    assert [s["iteration"] for s in t["summary"]] == [1, 2, 3]
    want = summary(c, a)  # (3, 12): 10 masses, mean entropy, weighted entropy
    assert want[0, 10] == pytest.approx(np.log(10), rel=1e-6)  # uniform c_i
    skipped = summary(skip_last_update(c), a)
    got = served_summary(t)
    # the masses (about 0.1) and the entropies (about 2.3), each on its own scale
    masses = {"iterations reversed": want[::-1, :10], "the last routing update skipped": skipped[:, :10],
              "coupling transposed": summary(transposed(c), a)[:, :10]}  # fmt: skip
    assert_right_not_wrong(got[:, :10], want[:, :10], masses)
    # (the mean entropy cannot see a transposed coupling: it is the mean of -c ln c over all of c)
    entropies = {"iterations reversed": want[::-1, 10:], "the last routing update skipped": skipped[:, 10:]}
    assert_right_not_wrong(got[:, 10:], want[:, 10:], entropies)


def test_mass_and_weighted_entropy_are_weighted_by_the_activations(client, session):
    """Weighting by |u_i| hardly matters where nearly every |u_i| is close to 1, as in the examples (it
    moves their masses by ~1e-5). Faint digits (MNIST x 0.3, sent as JSON) have |u_i| from 0.03 to 1:
    weighting moves their masses and weighted entropies by ~1.3e-4."""
    x = (mnist_test_images(8) * 0.3).astype(np.float32)
    probs, _, coupling, activations = session.run(None, {"image": x})
    got = []
    for i in range(len(x)):
        r = client.post("/routing-trace", json={"images": [x[i, 0].tolist()]})
        assert r.status_code == 200, r.text
        assert r.json()["class_index"] == int(probs[i].argmax())
        got.append(served_summary(r.json()))
    got = np.stack(got)  # (8 images, 3 iterations, 10 masses + 2 entropies)
    want = np.stack([summary(c, a) for c, a in zip(coupling, activations, strict=True)])
    unweighted = np.stack([summary(c, np.ones_like(a)) for c, a in zip(coupling, activations, strict=True)])
    assert_right_not_wrong(got[..., :10], want[..., :10], {"mass not weighted": unweighted[..., :10]})
    # The service's entropies are float32 sums of 1152 terms, 2e-7 off the float64 ones here: rtol 1e-6.
    unweighted_entropy = {"weighted entropy not weighted": unweighted[..., 11]}
    assert_right_not_wrong(got[..., 11], want[..., 11], unweighted_entropy, rtol=1e-6)


@pytest.mark.parametrize("name", ["7.png", "3.jpg"])
def test_aggregates_average_the_right_axis(client, traces, name):
    _, ref = traces[name]
    c = ref["coupling"].astype(np.float64)
    by_cell = c.reshape(3, TYPES, GRID, GRID, 10)  # capsule i = type*36 + row*6 + col
    # The same sizes read in another order: the layout mistakes that keep the output's shape.
    by_cell_wrong = c.reshape(3, GRID, GRID, TYPES, 10)  # as if i = (row*6 + col)*32 + type

    t = post_image(client, ROOT / "examples" / name, "?aggregate=type")
    assert t["aggregate"] == "type" and t["coupling_iterations"] == [1, 2, 3]
    want = by_cell.mean(axis=(2, 3))  # (3, 32, 10)
    wrong = {
        "(row, col, type) order": by_cell_wrong.mean(axis=(1, 2)),
        "iterations reversed": want[::-1],
        "the last routing update skipped": skip_last_update(want),
    }
    assert_right_not_wrong(t["coupling"], want, wrong)

    t = post_image(client, ROOT / "examples" / name, "?aggregate=position")
    want = by_cell.mean(axis=1)  # (3, 6, 6, 10)
    wrong = {
        "(row, col, type) order": by_cell_wrong.mean(axis=3),
        "rows and columns swapped": want.transpose(0, 2, 1, 3),
        "iterations reversed": want[::-1],
    }
    assert_right_not_wrong(t["coupling"], want, wrong)
    assert len(t["summary"]) == 3  # the summary always covers every iteration

    t = post_image(client, ROOT / "examples" / name, "?iterations=last&aggregate=type")
    assert t["coupling_iterations"] == [3]
    want = by_cell[-1:].mean(axis=(2, 3))
    first = by_cell[:1].mean(axis=(2, 3))
    assert_right_not_wrong(
        t["coupling"], want, {"the first iteration": first, "the second": by_cell[1:2].mean(axis=(2, 3))}
    )


def test_readme_figures_for_example_7_are_what_the_service_answers(traces):
    """docs/api.md, "What you will see with the shipped model": its numbers, parsed and recomputed."""
    t, _ = traces["7.png"]
    text = " ".join(API_DOC.split())
    m = re.search(
        r"spreads from ([\d.]+) \(iteration 1\) to between ([\d.]+) and ([\d.]+) \(iteration 3\) .*?"
        r"mass sent to class 7 only goes ([\d.]+) → ([\d.]+) → ([\d.]+) and the mean entropy "
        r"([\d.]+) → ([\d.]+) → ([\d.]+) nats",
        text,
    )
    assert m, "docs/api.md lost its routing figures for examples/7.png"
    uniform, low, high, *rest = m.groups()
    masses, entropies = rest[:3], rest[3:]
    c7 = np.array(t["coupling"])[:, :, 7]  # (3, 1152): every capsule's coupling to class 7
    assert t["class_index"] == 7
    assert {f"{v:.1f}" for v in c7[0]} == {uniform}
    assert (f"{c7[2].min():.3f}", f"{c7[2].max():.3f}") == (low, high)
    assert [f"{s['class_mass'][7]:.3f}" for s in t["summary"]] == masses
    assert [f"{s['mean_entropy']:.4f}" for s in t["summary"]] == entropies
