"""Training loop: Adam with exponential decay, margin + reconstruction loss, shift augmentation,
a checkpoint per epoch that `--resume` continues from, and a JSON-lines log of the run."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from capsnet.model_export import malloc
from capsnet.model_export.config import CapsNetConfig
from capsnet.model_export.data import dataset_checksum, get_spec, load_split, random_hflip, random_shift
from capsnet.model_export.model import CapsNet, capsnet_loss

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "capsnet-checkpoint/1"
DEFAULT_LR_DECAY = 0.96


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1).to(device)


@torch.inference_mode()
def predict(
    model: CapsNet, images: np.ndarray, batch_size: int = 500, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Capsule lengths (N, J) for uint8 images (N, 28, 28)."""
    model.eval()
    out = [
        model(to_tensor(images[i : i + batch_size], device))[0].cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def evaluate(model: CapsNet, images: np.ndarray, labels: np.ndarray, **kw: Any) -> float:
    return float((predict(model, images, **kw).argmax(1) == labels).mean())


def hardware_description(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    return (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {malloc.in_use()} allocator"
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs for CapsNetConfig fields (values parsed as JSON)."""
    names = {f.name for f in fields(CapsNetConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set expects KEY=VALUE with KEY in {sorted(names)}, got {item!r}")
        out[key] = json.loads(value)
    return out


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash never leaves half a checkpoint


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by `capsnet train`; raise ValueError otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def weights_from_export(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights and metadata of a model exported by `capsnet export` (capsnet.onnx + decoder.onnx).

    The export keeps parameter names (export._check_weights enforces it), so the ONNX initializers map
    one to one onto the state dict.
    """
    import onnx
    from onnx import numpy_helper

    weights: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file, prefix in (("capsnet.onnx", "model."), ("decoder.onnx", "")):
        proto = onnx.load(str(Path(model_dir) / file))
        if file == "capsnet.onnx":
            metadata = {p.key: p.value for p in proto.metadata_props}
        for init in proto.graph.initializer:
            if init.name.startswith(prefix) and init.name.removeprefix(prefix).count("."):
                weights[init.name.removeprefix(prefix)] = torch.from_numpy(numpy_helper.to_array(init).copy())
    return weights, metadata


def prior_training(model_dir: Path) -> dict[str, Any] | None:
    """The training record in an exported model's card, so the new card can tell the whole story."""
    card = model_dir / "model_card.json"
    return dict(json.loads(card.read_text())["training"]) if card.exists() else None


def state_initialized_from(path: Path) -> dict[str, Any] | None:
    return load_checkpoint(path).get("initialized_from") if path.exists() else None


def build_model(state: dict[str, Any]) -> CapsNet:
    """Rebuild the model from a checkpoint's stored config and load its weights strictly."""
    cfg = CapsNetConfig.from_dict(state["config"])
    model = CapsNet(cfg)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not match its config: {exc}") from exc
    return model


def train(
    *,
    dataset: str = "mnist",
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    lr_decay: float | None = None,
    routing_iterations: int = 3,
    seed: int = 0,
    device: str | None = None,
    output: Path = Path("runs/capsnet"),
    resume: bool = False,
    limit: int | None = None,
    eval_limit: int | None = None,
    max_shift: int = 2,
    hflip: bool = False,
    threads: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    data_dir: Path | None = None,
    init_from: Path | None = None,
    resume_lr: float | None = None,
    keep_epochs: int = 0,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train and return the final checkpoint dict (also written to output/last.pt every epoch).

    `lr_decay` is the learning rate's factor per epoch: DEFAULT_LR_DECAY for a new run; on `resume`,
    the checkpoint's unless one is given, which then applies from the next epoch on (a slower decay
    for a run that still underfits, with or without `resume_lr`)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its convolution algorithms
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    last_path, best_path, log_path = output / "last.pt", output / "best.pt", output / "log.jsonl"

    x_train, y_train = load_split(dataset, "train", data_dir=data_dir)
    x_test, y_test = load_split(dataset, "test", data_dir=data_dir)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    if eval_limit:
        x_test, y_test = x_test[:eval_limit], y_test[:eval_limit]

    torch.manual_seed(seed)
    cfg = CapsNetConfig(routing_iterations=routing_iterations, **(config_overrides or {}))
    model = CapsNet(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = DEFAULT_LR_DECAY if lr_decay is None else lr_decay
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    start_epoch, history, best_acc = 0, [], -1.0
    this_command = " ".join(["capsnet", *sys.argv[1:]]) if command is None else command
    earlier_runs: list[dict[str, Any]] = []  # the commands that trained the epochs before this one's
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        earlier_runs = state.get("runs") or [{"epochs": [1, state["epoch"]], "command": state["command"]}]
        if state["config"] != cfg.to_dict() or state["dataset"] != dataset:
            raise SystemExit(f"{last_path} was trained with another config or dataset; not resuming")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])  # its gamma too: the run's decay so far
        if lr_decay is not None:
            sched.gamma = lr_decay
        start_epoch, history = state["epoch"], state["history"]
        if resume_lr is not None:  # a new phase of the schedule (e.g. a final low-rate one); logged per epoch
            for group in opt.param_groups:
                group["lr"] = resume_lr
        best_acc = max((h["test_accuracy"] for h in history), default=-1.0)
        log.info("resuming from %s after epoch %d", last_path, start_epoch)
    elif not resume and log_path.exists():
        log_path.unlink()
    initialized_from: dict[str, Any] | None = None
    if init_from is not None and start_epoch == 0:
        # Warm start from an exported model: its weights, its epoch count (so the learning rate and
        # the data order continue where it stopped); Adam's moments start again from zero.
        weights, meta = weights_from_export(init_from)
        if json.loads(meta.get("config", "null")) != cfg.to_dict() or meta.get("dataset") != dataset:
            raise SystemExit(f"{init_from} was exported from another config or dataset")
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise SystemExit(f"{init_from}: weights do not fit the model: {exc}") from exc
        start_epoch = int(meta["epochs"])
        for group in opt.param_groups:
            group["lr"] = lr * sched.gamma**start_epoch
        sched.last_epoch = start_epoch
        initialized_from = {
            "model_dir": str(init_from),
            "version": meta.get("version"),
            "epochs": start_epoch,
            "test_accuracy": float(meta["test_accuracy"]),
            "training": prior_training(Path(init_from)),
        }
        log.info("initialized from %s (%d epochs)", init_from, start_epoch)
    elif resume and state_initialized_from(last_path) is not None:
        initialized_from = state_initialized_from(last_path)

    if dev.type == "cpu" and malloc.in_use() == "glibc" and malloc.tcmalloc() is None:
        log.warning(
            "training under the C library's malloc, which hands each step's large tensors out as fresh "
            "pages: with libtcmalloc-minimal4 installed, `capsnet train` runs under tcmalloc"
        )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("CapsNet %s, %d parameters, %d training images on %s", cfg, n_params, len(x_train), dev)
    steps = math.ceil(len(x_train) / batch_size)
    state: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        rng = np.random.default_rng([seed, epoch])  # same seed, same order and shifts
        order = rng.permutation(len(x_train))
        model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        step_seconds: list[float] = []  # each step's wall time, data preparation included
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            mininterval=2.0,
            unit="batch",
        )
        for step in bar:
            t_step = time.perf_counter()
            idx = order[step * batch_size : (step + 1) * batch_size]
            batch = random_hflip(x_train[idx], rng) if hflip else x_train[idx]
            images = to_tensor(random_shift(batch, max_shift, rng), dev)
            targets = torch.from_numpy(y_train[idx]).to(dev)
            loss, lengths = capsnet_loss(model, images, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((lengths.argmax(1) == targets).sum())
            step_seconds.append(time.perf_counter() - t_step)
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}", refresh=False)
        sched.step()
        train_seconds = time.perf_counter() - t0
        test_acc = evaluate(model, x_test, y_test, device=dev)
        # The pace of a typical step: a pause (SIGSTOP while benchmarks run) or a burst of other work
        # on the machine slows some steps, and moves the median little where it moves the mean.
        step_median = float(np.median(step_seconds))
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_accuracy": test_acc,
            "images_per_second": seen / train_seconds,
            "step_seconds_median": step_median,
            "steady_images_per_second": batch_size / step_median,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - t0 - train_seconds,
            "lr": opt.param_groups[0]["lr"],
        }
        history.append(record)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("epoch %d: %s", epoch + 1, record)
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "initialized_from": initialized_from,
            "dataset": dataset,
            "dataset_sha256": dataset_checksum(dataset),
            "labels": list(get_spec(dataset).labels),
            "test_accuracy": test_acc,
            "train_images": len(x_train),
            "command": this_command,
            "runs": runs_so_far(earlier_runs, this_command, start_epoch, epoch + 1),
            "hardware": hardware_description(dev),
            "args": {
                "batch_size": batch_size,
                "lr": lr,
                "lr_decay": sched.gamma,
                "seed": seed,
                "max_shift": max_shift,
                "hflip": hflip,
                "limit": limit,
                "eval_limit": eval_limit,
                "device": str(dev),
            },
        }
        save_checkpoint(last_path, state)
        if test_acc > best_acc:
            best_acc = test_acc
            save_checkpoint(best_path, state)
        if keep_epochs:
            keep_weights(output, state, keep_epochs)
    if not state:  # nothing left to train: hand back what is on disk
        state = load_checkpoint(last_path)
    return state


def keep_weights(output: Path, state: dict[str, Any], keep: int) -> None:
    """epoch-NNN.pt: this epoch's checkpoint without the optimizer state (a third of last.pt), for
    `capsnet average` over a run's last epochs; only the newest `keep` stay."""
    save_checkpoint(output / f"epoch-{state['epoch']:03d}.pt", without_optimizer(state))
    for old in sorted(output.glob("epoch-[0-9][0-9][0-9].pt"))[:-keep]:
        old.unlink()


def without_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}


def runs_so_far(
    earlier: list[dict[str, Any]], command: str, first_done: int, last: int
) -> list[dict[str, Any]]:
    """Which command trained which epochs, for the model card of a run resumed across sessions with
    other flags: the earlier runs, then this one (epochs first_done + 1 to last), merged into the last
    earlier run when it is the same command continuing it."""
    runs = [dict(run) for run in earlier]
    if runs and runs[-1]["command"] == command and runs[-1]["epochs"][1] == first_done:
        runs[-1]["epochs"] = [runs[-1]["epochs"][0], last]
    else:
        runs.append({"epochs": [first_done + 1, last], "command": command})
    return runs


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """One checkpoint whose weights are the mean of several of one run (e.g. its last epochs).

    CapsNet has no batch norm, so averaged weights need no statistics recomputed. The result keeps the
    last checkpoint's bookkeeping, drops the optimizer state and records what was averaged; its
    accuracy is measured again, never copied from the inputs.
    """
    states = [load_checkpoint(p) for p in paths]
    first = states[0]
    for path, st in zip(paths[1:], states[1:], strict=True):
        if st["config"] != first["config"] or st["dataset"] != first["dataset"]:
            raise ValueError(f"{path} is from another config or dataset than {paths[0]}")
    model = {k: sum(st["model"][k].float() for st in states) / len(states) for k in first["model"]}
    last = max(states, key=lambda st: st["epoch"])
    averaged = without_optimizer(last)
    averaged["model"] = model
    averaged["averaged_epochs"] = [st["epoch"] for st in states]
    averaged["test_accuracy"] = None  # not measured yet (write_average and the export measure it)
    return averaged


def write_average(checkpoints: list[Path], output: Path) -> dict[str, Any]:
    """`average_checkpoints`, its test accuracy measured, saved to `output`; the checkpoint dict."""
    state = average_checkpoints(checkpoints)
    x_test, y_test = load_split(state["dataset"], "test")
    model = build_model(state)
    state["test_accuracy"] = evaluate(model, x_test, y_test)
    log.info("averaged model: test accuracy %.4f (PyTorch)", state["test_accuracy"])
    save_checkpoint(output, state)
    return state
