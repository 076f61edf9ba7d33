import json

import pytest
import torch

from capsnet.model_export.train import build_model, load_checkpoint, train

NARROW = {"conv1_channels": 32, "primary_types": 8}


@pytest.mark.slow
def test_short_real_training_run_learns_mnist(tmp_path):
    """A narrow CapsNet, 3,000 real MNIST images, 1 epoch: measured 0.877 on the 10,000 test images."""
    state = train(
        epochs=1, limit=3000, batch_size=32, output=tmp_path, config_overrides=NARROW, progress=False, seed=0
    )
    assert state["test_accuracy"] >= 0.80
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 1 and log[-1]["test_accuracy"] == state["test_accuracy"]
    assert log[-1]["images_per_second"] > 0
    median = log[-1]["step_seconds_median"]  # 94 steps of 32 (the last one of 24)
    assert 0 < median < log[-1]["train_seconds"] / 47  # a typical step, not the sum of half of them
    assert log[-1]["steady_images_per_second"] == pytest.approx(32 / median)
    # the checkpoint alone rebuilds the model, and carries no surprise
    ckpt = load_checkpoint(tmp_path / "last.pt")
    model = build_model(ckpt)
    assert model.config.conv1_channels == 32 and ckpt["train_images"] == 3000


def test_same_seed_same_weights_and_resume(tmp_path):
    kw = {
        "limit": 64,
        "batch_size": 32,
        "config_overrides": {"conv1_channels": 8, "primary_types": 2},
        "progress": False,
        "seed": 3,
        "eval_limit": 200,
    }
    a = train(epochs=1, output=tmp_path / "a", **kw)
    b = train(epochs=1, output=tmp_path / "b", **kw)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # two epochs in one go equal one epoch + --resume for the second
    two = train(epochs=2, output=tmp_path / "c", **kw)
    resumed = train(epochs=2, output=tmp_path / "a", resume=True, **kw)
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    for k in two["model"]:
        assert torch.equal(two["model"][k], resumed["model"][k]), k


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_init_from_an_exported_model_continues_its_epochs(tiny_model_dir, tmp_path):
    from capsnet.model_export.train import weights_from_export
    from tests.factories import TINY, make_checkpoint

    weights, meta = weights_from_export(tiny_model_dir)
    exported = make_checkpoint(tmp_path / "same.pt")  # same seed as the exported tiny model
    assert weights.keys() == exported.state_dict().keys()
    for k, w in exported.state_dict().items():
        assert torch.equal(weights[k], w), k
    assert meta["epochs"] == "1"

    state = train(
        epochs=2,
        limit=64,
        batch_size=32,
        eval_limit=200,
        output=tmp_path / "run",
        progress=False,
        config_overrides=TINY,
        init_from=tiny_model_dir,
    )
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [2]
    assert state["history"][0]["lr"] == pytest.approx(1e-3 * 0.96**2)
    assert (
        state["initialized_from"]["epochs"] == 1 and state["initialized_from"]["version"] == meta["version"]
    )
    with pytest.raises(SystemExit, match="another config"):
        train(epochs=2, limit=32, output=tmp_path / "wide", progress=False, init_from=tiny_model_dir)


def test_average_checkpoints_means_the_weights_and_drops_the_optimizer(tmp_path):
    from capsnet.model_export.train import average_checkpoints, save_checkpoint

    kw = {"limit": 64, "batch_size": 32, "eval_limit": 100, "progress": False}
    kw["config_overrides"] = {"conv1_channels": 8, "primary_types": 2}
    one = train(epochs=1, output=tmp_path / "run", **kw)
    save_checkpoint(tmp_path / "e1.pt", one)
    two = train(epochs=2, output=tmp_path / "run", resume=True, **kw)
    avg = average_checkpoints([tmp_path / "e1.pt", tmp_path / "run" / "last.pt"])
    for k, w in avg["model"].items():
        torch.testing.assert_close(w, (one["model"][k] + two["model"][k]) / 2)
    assert avg["averaged_epochs"] == [1, 2] and avg["epoch"] == 2 and avg["test_accuracy"] is None
    assert "optimizer" not in avg and build_model(avg) is not None


def test_resume_lr_starts_a_new_phase_of_the_schedule(tmp_path):
    kw = {"limit": 32, "batch_size": 32, "eval_limit": 50, "progress": False, "output": tmp_path}
    kw["config_overrides"] = {"conv1_channels": 8, "primary_types": 2}
    first = train(epochs=1, **kw)
    assert first["history"][0]["lr"] == pytest.approx(1e-3 * 0.96)
    second = train(epochs=3, resume=True, resume_lr=1e-5, **kw)
    assert [h["lr"] for h in second["history"]] == pytest.approx([1e-3 * 0.96, 1e-5 * 0.96, 1e-5 * 0.96**2])


def test_resume_keeps_the_checkpoints_decay_unless_one_is_given(tmp_path):
    kw = {"limit": 32, "batch_size": 32, "eval_limit": 50, "progress": False}
    kw["config_overrides"] = {"conv1_channels": 8, "primary_types": 2}
    train(epochs=1, lr_decay=0.5, output=tmp_path / "a", **kw)
    kept = train(epochs=2, resume=True, output=tmp_path / "a", **kw)  # no decay given: the run's 0.5 goes on
    assert [h["lr"] for h in kept["history"]] == pytest.approx([1e-3 * 0.5, 1e-3 * 0.5**2])
    train(epochs=1, lr_decay=0.5, output=tmp_path / "b", **kw)
    slower = train(epochs=3, resume=True, lr_decay=0.9, output=tmp_path / "b", **kw)
    expected = [1e-3 * 0.5, 1e-3 * 0.5 * 0.9, 1e-3 * 0.5 * 0.9**2]
    assert [h["lr"] for h in slower["history"]] == pytest.approx(expected)
    assert slower["args"]["lr_decay"] == pytest.approx(0.9)


def test_the_checkpoint_says_which_command_trained_which_epochs(tmp_path):
    kw = {"limit": 32, "batch_size": 32, "eval_limit": 50, "progress": False, "output": tmp_path}
    kw["config_overrides"] = {"conv1_channels": 8, "primary_types": 2}
    train(epochs=1, command="capsnet train --epochs 1", **kw)
    same = train(epochs=2, resume=True, command="capsnet train --epochs 1", **kw)  # the same command goes on
    assert same["runs"] == [{"epochs": [1, 2], "command": "capsnet train --epochs 1"}]
    other = train(epochs=4, resume=True, lr_decay=0.9, command="capsnet train --epochs 4 --resume", **kw)
    assert other["runs"] == [
        {"epochs": [1, 2], "command": "capsnet train --epochs 1"},
        {"epochs": [3, 4], "command": "capsnet train --epochs 4 --resume"},
    ]
    old = torch.load(tmp_path / "last.pt", weights_only=True)  # a checkpoint from before runs were kept
    old.pop("runs")
    torch.save(old, tmp_path / "last.pt")
    later = train(epochs=5, resume=True, command="capsnet train --epochs 5 --resume", **kw)
    assert later["runs"] == [
        {"epochs": [1, 4], "command": "capsnet train --epochs 4 --resume"},
        {"epochs": [5, 5], "command": "capsnet train --epochs 5 --resume"},
    ]


def test_keep_epochs_leaves_the_last_epochs_weights_for_averaging(tmp_path):
    from capsnet.model_export.train import average_checkpoints

    kw = {"limit": 32, "batch_size": 32, "eval_limit": 50, "progress": False, "output": tmp_path}
    kw["config_overrides"] = {"conv1_channels": 8, "primary_types": 2}
    state = train(epochs=3, keep_epochs=2, **kw)
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-002.pt", "epoch-003.pt"]
    kept = load_checkpoint(tmp_path / "epoch-003.pt")
    assert "optimizer" not in kept and "scheduler" not in kept and kept["epoch"] == 3
    for name, w in state["model"].items():
        assert torch.equal(kept["model"][name], w), name
    size = (tmp_path / "epoch-003.pt").stat().st_size
    assert size < 0.5 * (tmp_path / "last.pt").stat().st_size  # Adam's two moments left out
    avg = average_checkpoints(sorted(tmp_path.glob("epoch-*.pt")))
    assert avg["averaged_epochs"] == [2, 3]
