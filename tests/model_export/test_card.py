import numpy as np
import pytest

from capsnet.model_export.card import build_card, evaluate_onnx, render_markdown
from capsnet.model_export.config import CapsNetConfig
from capsnet.model_export.data import load_split
from capsnet.model_export.model import CapsNet
from tests.checks import predicted_classes
from tests.factories import TINY


def test_card_of_a_warm_started_averaged_model_tells_the_whole_story(tiny_model_dir):
    cfg = CapsNetConfig(**TINY)
    prior = {
        "command": "capsnet train --epochs 3",
        "hardware": "first machine",
        "wall_seconds": 100.0,
        "images_per_second": [30.0, 31.0, 32.0],
        "test_accuracy_per_epoch_pytorch": [0.97, 0.98, 0.99],
    }
    state = {
        "config": cfg.to_dict(),
        "model": CapsNet(cfg).state_dict(),
        "dataset": "mnist",
        "dataset_sha256": "d" * 64,
        "labels": [str(i) for i in range(10)],
        "epoch": 5,
        "train_images": 60_000,
        "history": [
            {"train_seconds": 10.0, "eval_seconds": 2.0, "images_per_second": 40.0, "test_accuracy": 0.991},
            {"train_seconds": 11.0, "eval_seconds": 2.0, "images_per_second": 41.0, "test_accuracy": 0.992},
        ],
        "initialized_from": {"version": "mnist-e3-x", "epochs": 3, "test_accuracy": 0.99, "training": prior},
        "averaged_epochs": [4, 5],
    }
    meta = {
        "name": "tiny",
        "version": "v",
        "checkpoint_sha256": "c" * 64,
        "exported_at": "now",
        "opset": "17",
    }
    card = build_card(tiny_model_dir, state, meta, command="capsnet train --init-from m", hardware="here")
    tr = card["training"]
    assert tr["wall_seconds"] == 125.0 and tr["images_per_second"] == [30.0, 31.0, 32.0, 40.0, 41.0]
    assert tr["test_accuracy_per_epoch_pytorch"] == [0.97, 0.98, 0.99, 0.991, 0.992]
    assert tr["phases"] == [
        {
            "epochs": [1, 3],
            "hardware": "first machine",
            "wall_seconds": 100.0,
            "images_per_second": [30.0, 31.0, 32.0],
        },
        {"epochs": [4, 5], "hardware": "here", "wall_seconds": 25.0, "images_per_second": [40.0, 41.0]},
    ]
    assert tr["initialized_from"]["command"] == "capsnet train --epochs 3" and tr["averaged_epochs"] == [4, 5]
    x, y = load_split("mnist", "test")
    preds = predicted_classes(tiny_model_dir / "capsnet.onnx", x)  # not through evaluate_onnx
    np.testing.assert_array_equal(evaluate_onnx(tiny_model_dir / "capsnet.onnx", x), preds)
    assert card["evaluation"]["errors"] == int((preds != y).sum()) > 0
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (y, preds), 1)  # rows: true class, columns: predicted
    assert card["evaluation"]["confusion_matrix"] == confusion.tolist()
    assert card["evaluation"]["test_accuracy"] == pytest.approx(float((preds == y).mean()), abs=1e-12)
    md = render_markdown(card)
    assert "Epochs 1-3 are those of model mnist-e3-x (99.00 % after them)" in md
    assert "  - epochs 1-3: 1.7 min on first machine, 30.0-32.0 images/s (median 31.0)" in md
    assert "  - epochs 4-5: 0.4 min on here, 40.0-41.0 images/s (median 40.5)" in md
    assert (
        "average of the checkpoints after epochs [4, 5]" in md and "125" not in md.split("min wall")[0][-8:]
    )


def test_phases_chain_across_several_warm_starts():
    from capsnet.model_export.card import _phases

    first = {"epochs": [1, 2], "hardware": "cpu", "wall_seconds": 60.0, "images_per_second": [30.0, 31.0]}
    second = {"epochs": [3, 3], "hardware": "cpu", "wall_seconds": 30.0, "images_per_second": [32.0]}
    prior = {"phases": [first, second], "epochs": 3, "hardware": "cpu", "wall_seconds": 90.0}
    history = [{"train_seconds": 4.0, "eval_seconds": 0.1, "images_per_second": 15000.0}]
    phases = _phases(prior, history, "gpu", epochs=4)
    assert phases == [
        first,
        second,
        {"epochs": [4, 4], "hardware": "gpu", "wall_seconds": 4.1, "images_per_second": [15000.0]},
    ]
    assert _phases({}, history, "gpu", epochs=1)[0]["epochs"] == [1, 1]  # a run from scratch: one phase


def test_a_phase_shows_the_median_steps_pace_beside_the_wall_clock_rate():
    """An epoch paused for a benchmark: its wall-clock rate falls, its median step's pace does not."""
    from capsnet.model_export.card import _phase_line, _phases

    history = [
        {"train_seconds": 1000.0, "eval_seconds": 50.0, "images_per_second": 60.0},
        {"train_seconds": 2000.0, "eval_seconds": 50.0, "images_per_second": 30.0},  # half of it paused
    ]
    history[0]["steady_images_per_second"], history[1]["steady_images_per_second"] = 61.04, 60.0
    (phase,) = _phases({}, history, "cpu", epochs=2)
    assert phase["steady_images_per_second"] == [61.0, 60.0]
    assert _phase_line(phase) == (
        "  - epochs 1-2: 51.7 min on cpu, 30.0-60.0 images/s (median 45.0); at the median step's pace "
        "60.5 images/s (pauses and other work on the machine move the mean, not the median)"
    )
    older = [{k: v for k, v in h.items() if k != "steady_images_per_second"} for h in history]
    assert "steady_images_per_second" not in _phases({}, older, "cpu", epochs=2)[0]  # not recorded then
    (mixed,) = _phases({}, [older[0], history[1]], "cpu", epochs=2)  # a run resumed with newer code
    assert mixed["steady_images_per_second"] == [None, 60.0]
    assert "(median 45.0); at the median step's pace 60.0 images/s over 1 of its 2 epochs (" in (
        _phase_line(mixed)
    )


def test_known_limits_name_the_dataset_and_the_runs_augmentation():
    from capsnet.model_export.card import known_limits

    fashion = known_limits("fashion-mnist", {"max_shift": 2, "hflip": True})
    assert "Trained on Fashion-MNIST only" in fashion[0] and "preprocess=fashion" in fashion[1]
    assert not any("digit" in line.lower() for line in fashion)
    assert fashion[-1] == (
        "Shift augmentation of +-2 px, and left-right mirroring of half the images; "
        "no rotation or scale augmentation."
    )
    mnist = known_limits("mnist", {"max_shift": 3})
    assert "Trained on MNIST digits only" in mnist[0] and "MNIST-style preprocessing" in mnist[1]
    assert mnist[-1] == "Shift augmentation of +-3 px; no rotation or scale augmentation."
    # checkpoints without args: the paper's 2 px
    assert known_limits("mnist", {})[-1].startswith("Shift augmentation of +-2 px;")
    # a run resumed without --hflip: the line names the mirrored epochs, not only the last run's flags
    runs = [
        {"epochs": [1, 8], "command": "capsnet train --lr-decay 0.9 --max-shift 2 --hflip"},
        {"epochs": [9, 25], "command": "capsnet train --lr-decay 0.97 --hf --output it's --resume"},
        {"epochs": [26, 30], "command": "capsnet train --lr-decay 0.97 --max-shift 2 --resume"},
    ]
    assert known_limits("fashion-mnist", {"max_shift": 2, "hflip": False}, runs)[-1] == (
        "Shift augmentation of +-2 px, and left-right mirroring of half the images in epochs 1-25 only; "
        "no rotation or scale augmentation."
    )
    same = [{**run, "command": run["command"] + " --hflip"} for run in runs[2:]]
    assert known_limits("fashion-mnist", {"max_shift": 2, "hflip": True}, runs[:2] + same)[-1] == fashion[-1]


def test_a_run_resumed_with_other_flags_lists_each_command():
    from capsnet.model_export.card import _command_lines

    runs = [
        {"epochs": [1, 8], "command": "capsnet train --lr-decay 0.9"},
        {"epochs": [9, 30], "command": "capsnet train --lr-decay 0.97 --resume"},
    ]
    assert _command_lines({"command": runs[-1]["command"], "runs": runs}) == [
        "- Commands, in order (each resumed the run where the one before stopped):",
        "  - epochs 1-8: `capsnet train --lr-decay 0.9`",
        "  - epochs 9-30: `capsnet train --lr-decay 0.97 --resume`",
    ]
    one = {
        "command": "capsnet train --epochs 3",
        "runs": [{"epochs": [1, 3], "command": "capsnet train --epochs 3"}],
    }
    assert _command_lines(one) == ["- Command: `capsnet train --epochs 3`"]
    assert _command_lines({"command": "told by --train-command", "runs": None}) == [
        "- Command: `told by --train-command`"
    ]
