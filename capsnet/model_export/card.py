"""The model card: figures measured through the exported ONNX file with onnxruntime, not PyTorch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from capsnet.model_export.config import CapsNetConfig
from capsnet.model_export.data import get_spec, load_split

# Another CPU's fp32 kernels sum in another order, which moves a capsule length by about 1e-6: an image
# whose top two lengths are this close may change class there (the card counts them).
FP32_TIE_MARGIN = 1e-4


def measured_on() -> dict[str, Any]:
    """The CPU the card's figures come from, with the features that decide its kernels."""
    from capsnet.service.cpu import vector_extensions

    ext = vector_extensions()
    return {k: ext[k] for k in ("model", "present", "int8_kernels")}


def onnx_probabilities(model: Path | Any, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Capsule lengths (N, classes) for uint8 images (N, 28, 28): `model` is an ONNX file, run by
    onnxruntime's CPU provider, or an open InferenceSession (any provider)."""
    import onnxruntime as ort

    sess = (
        model
        if isinstance(model, ort.InferenceSession)
        else ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    )
    out = []
    for i in range(0, len(images), batch_size):
        x = (images[i : i + batch_size].astype(np.float32) / 255.0)[:, None]
        out.append(sess.run(["probabilities"], {"image": x})[0])
    return np.concatenate(out)


def evaluate_onnx(model: Path | Any, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Predicted classes for uint8 images (N, 28, 28), as `onnx_probabilities` runs them."""
    return onnx_probabilities(model, images, batch_size).argmax(1)  # type: ignore[no-any-return]


def near_ties(probabilities: np.ndarray, margin: float) -> int:
    """Images whose two largest capsule lengths are within `margin`: the only ones whose class can
    change where the lengths move by less than margin / 2 (another CPU, another summation order)."""
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    return int((top2[:, 1] - top2[:, 0] < margin).sum())


def confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def build_card(
    model_dir: Path, state: dict[str, Any], export_meta: dict[str, str], *, command: str, hardware: str
) -> dict[str, Any]:
    cfg = CapsNetConfig.from_dict(state["config"])
    labels = list(state["labels"])
    ev = evaluation(model_dir / "capsnet.onnx", state["dataset"], labels)
    history = state.get("history", [])
    spec = get_spec(state["dataset"])
    prior = (state.get("initialized_from") or {}).get("training") or {}
    phases = _phases(prior, history, hardware, state["epoch"])
    return {
        "name": export_meta["name"],
        "version": export_meta["version"],
        "architecture": "CapsNet (Sabour, Frosst & Hinton 2017, arXiv 1710.09829)",
        "config": cfg.to_dict(),
        "parameters": _parameter_count(state),
        "dataset": {
            "name": state["dataset"],
            "sha256": state["dataset_sha256"],
            "files_sha256": spec.sha256,
            "train_images": state.get("train_images"),
            "test_images": int(np.sum(ev["confusion_matrix"])),
        },
        "training": {
            "command": command,
            # each command and the epochs it trained, when the run was resumed with other flags (and no
            # --train-command replaced the checkpoint's own)
            "runs": state.get("runs") if command == state.get("command") else None,
            "hardware": hardware,
            "epochs": state["epoch"],
            "wall_seconds": round(sum(ph["wall_seconds"] for ph in phases), 1),
            "images_per_second": [rate for ph in phases for rate in ph["images_per_second"]],
            "test_accuracy_per_epoch_pytorch": prior.get("test_accuracy_per_epoch_pytorch", [])
            + [h["test_accuracy"] for h in history],
            "phases": phases,
            "args": state.get("args", {}),
            "initialized_from": {
                k: v for k, v in (state.get("initialized_from") or {}).items() if k != "training"
            }
            | ({"command": prior["command"], "hardware": prior["hardware"]} if prior else {})
            or None,
            "averaged_epochs": state.get("averaged_epochs"),
        },
        "evaluation": ev,
        "export": {k: export_meta[k] for k in ("checkpoint_sha256", "exported_at", "opset")},
        "known_limits": known_limits(state["dataset"], state.get("args", {}), state.get("runs")),
    }


# What a model of each dataset cannot do, as its card says it; the augmentation line follows the run's args.
DATASET_LIMITS = {
    "mnist": [
        "Trained on MNIST digits only: anything else (letters, several digits, objects) still gets "
        "the closest digit; capsule lengths are independent, so look at the lengths, not only argmax.",
        "Photos and scans go through an MNIST-style preprocessing (invert, crop, 20x20, centre of "
        "mass); heavy clutter, several digits or very thin strokes can defeat it.",
    ],
    "fashion-mnist": [
        "Trained on Fashion-MNIST only (T-shirts, trousers, pullovers, dresses, coats, sandals, shirts, "
        "sneakers, bags, ankle boots as 28x28 grey product photos): anything else still gets the closest "
        "of the 10 classes; capsule lengths are independent, so look at the lengths, not only argmax.",
        "Photos go through Zalando's product-photo conversion (`preprocess=fashion`: trim a light "
        "background, fit to 28x28, negate): one product on a plain light background; a worn garment, "
        "a busy background or several items can defeat it.",
    ],
}


def known_limits(dataset: str, args: dict[str, Any], runs: list[dict[str, Any]] | None = None) -> list[str]:
    """The dataset's limits and the augmentation line. `args` are the last run's flags; `runs` (which
    command trained which epochs) say where a run resumed with other flags mirrored only some epochs."""
    shift = args.get("max_shift", 2)
    mirrored = ", and left-right mirroring of half the images" if args.get("hflip") else ""
    flipped = [run["epochs"] for run in runs or [] if _mirrors(run["command"])]
    if flipped and len(flipped) < len(runs or []):
        merged: list[list[int]] = []
        for a, b in flipped:  # runs that follow each other make one span
            if merged and merged[-1][1] + 1 == a:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        spans = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in merged)
        mirrored = f", and left-right mirroring of half the images in epochs {spans} only"
    augmentation = f"Shift augmentation of +-{shift} px{mirrored}; no rotation or scale augmentation."
    return [*DATASET_LIMITS[dataset], augmentation]


def _mirrors(command: str) -> bool:
    """Whether a recorded `capsnet train` command had --hflip. The record is its argv joined by spaces
    (not shell-quoted: shlex would choke on a quote in a path), and argparse also took a prefix (--hf)."""
    return any(len(word) >= 4 and "--hflip".startswith(word) for word in command.split())


def evaluation(model: Path, dataset: str, labels: list[str]) -> dict[str, Any]:
    """The card's figures for an fp32 classifier file: the whole test split through onnxruntime."""
    x, y = load_split(dataset, "test")
    t0 = time.perf_counter()
    probabilities = onnx_probabilities(model, x)
    preds = probabilities.argmax(1)
    eval_seconds = time.perf_counter() - t0
    cm = confusion(y, preds, len(labels))
    return {
        "runtime": "onnxruntime CPUExecutionProvider",
        "test_accuracy": float((preds == y).mean()),
        "errors": int((preds != y).sum()),
        "per_class_accuracy": {lab: float(cm[k, k] / cm[k].sum()) for k, lab in enumerate(labels)},
        "confusion_matrix": cm.tolist(),
        "seconds": round(eval_seconds, 1),
        "cpu": measured_on(),
        "near_ties": {"margin": FP32_TIE_MARGIN, "images": near_ties(probabilities, FP32_TIE_MARGIN)},
    }


def _parameter_count(state: dict[str, Any]) -> dict[str, int]:
    total = sum(int(np.prod(t.shape)) for t in state["model"].values())
    decoder = sum(int(np.prod(t.shape)) for k, t in state["model"].items() if k.startswith("decoder."))
    return {"total": total, "without_decoder": total - decoder}


def _phases(
    prior: dict[str, Any], history: list[dict[str, Any]], hardware: str, epochs: int
) -> list[dict[str, Any]]:
    """One entry per stretch of epochs run on one machine, so a run continued elsewhere (a CPU start,
    a GPU finish) reports each machine's time and speed, not one sum under the last machine's name."""
    phases: list[dict[str, Any]] = list(prior.get("phases") or [])
    if prior and not phases:  # a card written before phases existed: its whole record is one
        phases = [
            {
                "epochs": [1, prior.get("epochs") or len(prior["images_per_second"])],
                "hardware": prior["hardware"],
                "wall_seconds": prior["wall_seconds"],
                "images_per_second": prior["images_per_second"],
            }
        ]
    if history:
        phase: dict[str, Any] = {
            "epochs": [epochs - len(history) + 1, epochs],
            "hardware": hardware,
            "wall_seconds": round(sum(h["train_seconds"] + h["eval_seconds"] for h in history), 1),
            "images_per_second": [round(h["images_per_second"], 1) for h in history],
        }
        if any("steady_images_per_second" in h for h in history):  # recorded since 2026-12-07: None before
            phase["steady_images_per_second"] = [
                round(h["steady_images_per_second"], 1) if "steady_images_per_second" in h else None
                for h in history
            ]
        phases.append(phase)
    return phases


def _phase_line(ph: dict[str, Any]) -> str:
    rates = ph["images_per_second"]
    first, last = ph["epochs"]
    span = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    speed = f"{rates[0]:,.1f}" if len(rates) == 1 else f"{min(rates):,.1f}-{max(rates):,.1f}"
    line = (
        f"  - {span}: {ph['wall_seconds'] / 60:.1f} min on {ph['hardware']}, "
        f"{speed} images/s (median {float(np.median(rates)):,.1f})"
    )
    steady = [r for r in ph.get("steady_images_per_second") or [] if r is not None]
    if steady:
        which = "" if len(steady) == len(rates) else f" over {len(steady)} of its {len(rates)} epochs"
        line += (
            f"; at the median step's pace {float(np.median(steady)):,.1f} images/s{which} (pauses and other "
            "work on the machine move the mean, not the median)"
        )
    return line


def _command_lines(tr: dict[str, Any]) -> list[str]:
    runs = tr.get("runs") or []
    if len(runs) < 2:
        return [f"- Command: `{tr['command']}`"]
    lines = ["- Commands, in order (each resumed the run where the one before stopped):"]
    for run in runs:
        first, last = run["epochs"]
        span = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        lines.append(f"  - {span}: `{run['command']}`")
    return lines


def _provenance(tr: dict[str, Any]) -> list[str]:
    """Card lines for a warm start (`capsnet train --init-from`) and for averaged weights."""
    lines = []
    init = tr.get("initialized_from")
    if init:
        lines.append(
            f"- Epochs 1-{init['epochs']} are those of model {init['version']} "
            f"({init['test_accuracy'] * 100:.2f} % after them), trained with `{init.get('command', '?')}`; "
            "this run started from its exported weights and epoch count, with a fresh Adam state."
        )
    if tr.get("averaged_epochs"):
        lines.append(
            f"- The weights are the average of the checkpoints after epochs {tr['averaged_epochs']} "
            "(no batch norm, so nothing is recalibrated); the accuracy above is the averaged model's."
        )
    return lines


def render_markdown(card: dict[str, Any]) -> str:
    ev, tr, ds = card["evaluation"], card["training"], card["dataset"]
    labels = list(ev["per_class_accuracy"])
    lines = [
        f"# Model card: {card['name']} ({card['version']})",
        "",
        f"{card['architecture']}: {card['parameters']['total']:,} parameters "
        f"({card['parameters']['without_decoder']:,} without the reconstruction decoder), "
        f"r = {card['config']['routing_iterations']} routing iterations.",
        "",
        "## Figures (measured through the exported ONNX file with onnxruntime, CPU provider)",
        "",
        f"- Test accuracy: **{ev['test_accuracy'] * 100:.2f} %** on the {ds['test_images']:,} "
        f"{ds['name']} test images ({ev['errors']} errors).",
        *_cpu_lines(ev),
        f"- Training: {tr['epochs']} epoch(s), {tr['wall_seconds'] / 60:.1f} min wall time in all "
        "(per-epoch figures in model_card.json):",
        *[_phase_line(ph) for ph in tr["phases"]],
        *_command_lines(tr),
        *_provenance(tr),
        f"- Data: {ds['name']} in IDX format, {ds['train_images']:,} training images, dataset SHA-256 "
        f"`{ds['sha256']}` (hash of the four file hashes, listed in model_card.json).",
        f"- Checkpoint SHA-256 `{card['export']['checkpoint_sha256']}`, "
        f"exported {card['export']['exported_at']}, opset {card['export']['opset']}.",
        "",
        "## Per-class accuracy",
        "",
        "| class | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
        "| accuracy % | " + " | ".join(f"{ev['per_class_accuracy'][k] * 100:.2f}" for k in labels) + " |",
        "",
        "## Confusion matrix (rows: true class, columns: predicted)",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    lines += [
        f"| **{lab}** | " + " | ".join(str(v) for v in row) + " |"
        for lab, row in zip(labels, ev["confusion_matrix"], strict=True)
    ]
    lines += _int8_lines(card.get("int8"))
    lines += ["", "## Known limits", ""] + [f"- {x}" for x in card["known_limits"]] + [""]
    return "\n".join(lines)


def _cpu_lines(ev: dict[str, Any]) -> list[str]:
    """Where the accuracy was measured and how far another CPU can move it."""
    if "near_ties" not in ev:
        return []
    ties = ev["near_ties"]
    return [
        f"  - Measured on {_cpu_text(ev['cpu'])}. On another CPU fp32 sums in another order: at most the "
        f"{ties['images']} test image(s) whose top two lengths are within {ties['margin']:g} can change "
        f"class, so the accuracy there is within {ties['images']} image(s) of this one.",
    ]


def _cpu_text(cpu: dict[str, Any]) -> str:
    features = ", ".join(cpu["present"]) or "features unknown"
    return f"{cpu['model']} ({features}; int8 kernels {cpu['int8_kernels']})"


def _int8_lines(q: dict[str, Any] | None) -> list[str]:
    """The int8 variant's section (written by `capsnet quantize`): both accuracies, measured together."""
    if not q:
        return []
    cal = q["calibration"]
    drop = (q["fp32_test_accuracy"] - q["test_accuracy"]) * 100
    if q.get("written") is False:
        return [
            "",
            "## int8 variant: not shipped",
            "",
            f"- `capsnet quantize` refused it: **{q['test_accuracy'] * 100:.2f} %** int8 ({q['errors']} "
            f"errors) against {q['fp32_test_accuracy'] * 100:.2f} % fp32 ({q['fp32_errors']} errors) on the "
            f"same {q['test_images']:,} test images through {q['runtime']}, {drop:.2f} points lost where at "
            f"most {q['max_drop'] * 100:.1f} are allowed ({cal['method']} ranges from {cal['images']} "
            f"{cal['split']} images; weights {q['weights']}, activations {q['activations']}).",
            "- With `CAPSNET_PRECISION=int8` this model is served in fp32 when it is served beside the "
            "default model (with a warning in the log; its `/metadata` says `precision: fp32`); as the "
            "default model it needs the file.",
        ]
    return [
        "",
        f"## int8 variant ({q['file']}, for CPUs)",
        "",
        f"- Test accuracy: **{q['test_accuracy'] * 100:.2f} %** int8 ({q['errors']} errors) against "
        f"{q['fp32_test_accuracy'] * 100:.2f} % fp32 ({q['fp32_errors']} errors) on the same "
        f"{q['test_images']:,} test images through {q['runtime']}: {drop:.2f} points lost "
        f"(refused beyond {q['max_drop'] * 100:.1f}).",
        f"- {q['format']}, {', '.join(q['quantized_ops'])} in int8: weights {q['weights']}, activations "
        f"{q['activations']}; in fp32: {q['fp32_ops']}.",
        f"- Calibrated on {cal['images']} images of the {cal['dataset']} {cal['split']} split (seed "
        f"{cal['seed']}, {cal['method']} ranges), never the test set. File SHA-256 `{q['sha256']}`.",
        *_int8_cpu_lines(q),
    ]


def _int8_cpu_lines(q: dict[str, Any]) -> list[str]:
    """How the int8 answers hold across CPUs (files from `capsnet quantize` with 7-bit weights)."""
    if "weight_bits" not in q:
        return []
    ties, vs = q["near_ties"], q["vs_fp32"]
    return [
        f"- Per CPU class: {q['test_accuracy'] * 100:.2f} % measured on {_cpu_text(q['cpu'])}. "
        f"{q['weight_bits']}-bit weights keep every pair of int8 products within 16 bits, so CPUs without "
        "VNNI (whose int8 sums saturate) compute the same integers as VNNI and AMX CPUs (exact 32-bit "
        f"sums): here the probabilities were within {q['max_gap_to_exact_integers']:.4f} of exact integer "
        "arithmetic (the file run with graph optimizations off, DequantizeLinear then fp32 Conv: "
        f"{q['exact_integer_accuracy'] * 100:.2f} %) on every test image; `capsnet quantize` refuses a file "
        f"beyond {q['exact_tolerance']}.",
        f"- Tolerance across CPUs: at most the {ties['images']} test image(s) whose top two int8 "
        f"probabilities are within {ties['margin']:g} can change class on another CPU, so the int8 accuracy "
        f"there is within {ties['images']} image(s) of this one. Against fp32, int8 moves an image's "
        f"probabilities by at most {vs['max']:.3f} ({vs['p99']:.3f} at the 99th percentile).",
        "- Speed: int8 pays on CPUs with VNNI (AVX-512 VNNI, AVX-VNNI) or AMX; without VNNI its gain over "
        "fp32 is smaller and the service says so when it starts (docs/performance.md has the figures).",
    ]


def write_card(
    model_dir: Path, state: dict[str, Any], export_meta: dict[str, str], *, command: str, hardware: str
) -> dict[str, Any]:
    card = build_card(model_dir, state, export_meta, command=command, hardware=hardware)
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (model_dir / "MODEL_CARD.md").write_text(render_markdown(card))
    return card
