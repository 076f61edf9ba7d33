"""The `capsnet` command: data, train, export, serve, predict.

Imports are lazy, so `capsnet serve` never loads torch and runs on the serving install alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _data(args: argparse.Namespace) -> None:
    from capsnet.model_export.data import DataError, default_cache_dir, fetch

    for name in args.datasets:
        try:
            sources = fetch(name, data_dir=args.data_dir, cache_dir=args.cache_dir)
        except DataError as exc:
            raise SystemExit(str(exc)) from None
        where = (args.cache_dir or default_cache_dir()) / name
        for fname, src in sources.items():
            print(f"{name}/{fname}: verified, from {src}, cached in {where}")


def _train(args: argparse.Namespace) -> None:
    from capsnet.model_export.train import parse_overrides, train

    state = train(
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        routing_iterations=args.routing_iterations,
        seed=args.seed,
        device=args.device,
        output=args.output,
        resume=args.resume,
        limit=args.limit,
        eval_limit=args.eval_limit,
        max_shift=args.max_shift,
        hflip=args.hflip,
        threads=args.threads,
        config_overrides=parse_overrides(args.set),
        data_dir=args.data_dir,
        init_from=args.init_from,
        resume_lr=args.resume_lr,
        keep_epochs=args.keep_epochs,
    )
    print(
        f"epoch {state['epoch']}: test accuracy {state['test_accuracy']:.4f}; "
        f"checkpoint {args.output / 'last.pt'}"
    )


def _average(args: argparse.Namespace) -> None:
    from capsnet.model_export.train import write_average

    state = write_average(args.checkpoints, args.output)
    print(f"averaged epochs {state['averaged_epochs']} into {args.output}")


def _export(args: argparse.Namespace) -> None:
    from capsnet.model_export.export import ExportError, export_directory

    try:
        summary = export_directory(
            args.checkpoint,
            args.output,
            name=args.name,
            card=args.card,
            train_command=args.train_command,
            hardware=args.hardware,
            fp16=args.fp16,
            triton=args.triton,
        )
    except ExportError as exc:
        raise SystemExit(f"export failed: {exc}") from None
    print(json.dumps(summary))


def _fp16(args: argparse.Namespace) -> None:
    from capsnet.model_export.fp16 import write_fp16

    if not (args.model_dir / "capsnet.onnx").is_file():
        raise SystemExit(
            f"capsnet fp16: {args.model_dir / 'capsnet.onnx'} not found (run `capsnet export` first)"
        )
    path = write_fp16(args.model_dir)
    full = (args.model_dir / "capsnet.onnx").stat().st_size
    print(f"wrote {path}: {path.stat().st_size / 1e6:.1f} MB (capsnet.onnx: {full / 1e6:.1f} MB)")


def _quantize(args: argparse.Namespace) -> None:
    from capsnet.model_export.quantize import QuantizeError, write_int8

    try:
        r = write_int8(args.model_dir, calibration=args.calibration_images, max_drop=args.max_drop / 100)
    except QuantizeError as exc:
        raise SystemExit(f"capsnet quantize: {exc}") from None
    except ImportError as exc:  # onnxruntime's quantization tools need the onnx package (no torch)
        raise SystemExit(f"capsnet quantize needs the onnx package: {exc}") from None
    print(
        f"wrote {args.model_dir / r['file']}: {r['bytes'] / 1e6:.1f} MB; test accuracy int8 "
        f"{r['test_accuracy']:.2%} ({r['errors']} errors), fp32 {r['fp32_test_accuracy']:.2%} "
        f"({r['fp32_errors']} errors) on {r['test_images']} images"
    )


def _triton(args: argparse.Namespace) -> None:
    from capsnet.model_export.triton import TritonExportError, TritonOptions, write_repository

    options = TritonOptions(
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instance_kind=args.instance_kind,
        instance_count=args.instances,
        version=args.version,
    )
    try:
        written = write_repository(args.model_dir, args.output, name=args.name, options=options)
    except TritonExportError as exc:
        raise SystemExit(f"triton: {exc}") from None
    print(json.dumps({"repository": str(args.output), "models": written}))


def _serve(args: argparse.Namespace) -> None:
    from capsnet.service.cli import serve

    serve(host=args.host, port=args.port, workers=args.workers, model_dir=args.model_dir)


def _predict(args: argparse.Namespace) -> None:
    from capsnet.predict import PredictError, predict

    try:
        status = predict(
            args.paths,
            output=args.output,
            preprocess=args.preprocess,
            model_dir=args.model_dir,
            batch_size=args.batch_size,
            decode_threads=args.decode_threads,
            url=args.url,
            model=args.model,
            concurrency=args.concurrency,
            api_key=args.api_key,
            stdout=sys.stdout,
            stderr=sys.stderr,
        )
    except PredictError as exc:
        raise SystemExit(f"capsnet predict: {exc}") from None
    raise SystemExit(status)


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train a CapsNet (needs the [train] extra)")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--lr-decay",
        type=float,
        default=None,
        help="exponential decay per epoch (default 0.96; with --resume the checkpoint's, or this one "
        "from the next epoch on)",
    )
    p.add_argument("--routing-iterations", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--output", type=Path, default=Path("runs/capsnet"))
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument(
        "--resume-lr",
        type=float,
        default=None,
        help="with --resume: go on at this learning rate (decayed per epoch as before), a low-rate phase",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights and epoch count of an exported model directory (fresh optimizer)",
    )
    p.add_argument(
        "--keep-epochs",
        type=int,
        default=0,
        metavar="K",
        help="also keep the last K epochs' weights (OUTPUT/epoch-NNN.pt, no optimizer state) for "
        "`capsnet average`",
    )
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--max-shift", type=int, default=2, help="random shift augmentation, pixels")
    p.add_argument(
        "--hflip", action="store_true", help="also mirror half the images left-right (clothes, not digits)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--malloc",
        choices=["auto", "system"],
        default="auto",
        help="auto: run under tcmalloc when the system has it (Debian: libtcmalloc-minimal4), whose reuse "
        "of freed memory spares every step's large tensors their page faults; system: the C library's",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="a directory holding the IDX files")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a CapsNetConfig field, e.g. --set conv1_channels=64",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("average", help="average the weights of several checkpoints of one run")
    p.add_argument("checkpoints", type=Path, nargs="+", help="checkpoints written by `capsnet train`")
    p.add_argument("--output", type=Path, required=True)
    p.set_defaults(func=_average)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and verify MNIST / Fashion-MNIST into the cache")
    p.add_argument("datasets", nargs="*", default=["mnist"], choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", type=Path, default=None, help="a directory holding the IDX files")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $CAPSNET_DATA_DIR or ~/.cache/capsnet/data"
    )
    p.set_defaults(func=_data)

    _add_train(sub)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, verified against PyTorch")
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by `capsnet train`")
    p.add_argument("--output", type=Path, default=Path("models/capsnet-mnist"))
    p.add_argument("--name", default="capsnet-mnist", help="model name stored in the metadata")
    p.add_argument(
        "--no-card",
        dest="card",
        action="store_false",
        help="skip the model card (it evaluates the ONNX file on the whole test set)",
    )
    p.add_argument("--train-command", default=None, help="for the card, if the checkpoint lacks it")
    p.add_argument("--hardware", default=None, help="for the card, if the checkpoint lacks it")
    p.add_argument(
        "--triton",
        type=Path,
        default=None,
        metavar="REPO",
        help="also write a Triton model repository (REPO/capsnet, default settings; see `capsnet triton`)",
    )
    p.add_argument("--fp16", action="store_true", help="also write capsnet-fp16.onnx (see `capsnet fp16`)")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "fp16", help="write capsnet-fp16.onnx beside an exported model (for GPUs; CAPSNET_PRECISION=fp16)"
    )
    p.add_argument("model_dir", type=Path, help="a directory written by `capsnet export`")
    p.set_defaults(func=_fp16)

    p = sub.add_parser(
        "quantize",
        help="write capsnet-int8.onnx beside an exported model (for CPUs; CAPSNET_PRECISION=int8), "
        "refused if it loses more than 0.1 point of test accuracy",
    )
    p.add_argument("model_dir", type=Path, help="a directory written by `capsnet export`")
    p.add_argument(
        "--calibration-images", type=int, default=512, help="training images that set the int8 ranges"
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.1,
        metavar="POINTS",
        help="refuse to write the file if int8 test accuracy is more than this many points below fp32",
    )
    p.set_defaults(func=_quantize)

    p = sub.add_parser(
        "triton", help="a Triton model repository from an exported model directory (no torch needed)"
    )
    p.add_argument("model_dir", type=Path, help="a directory with capsnet.onnx (+ decoder.onnx)")
    p.add_argument("--output", type=Path, required=True, help="the model repository to write")
    p.add_argument("--name", default="capsnet", help="Triton model name (the decoder gets NAME_decoder)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching queue delay")
    p.add_argument("--instance-kind", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--instances", type=int, default=1, help="model instances (per GPU for gpu)")
    p.add_argument("--version", type=int, default=1, help="version directory to write")
    p.set_defaults(func=_triton)

    p = sub.add_parser("serve", help="serve the model over HTTP (settings: CAPSNET_* variables)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (CAPSNET_WORKERS, 1)")
    p.add_argument("--model-dir", type=Path, default=None, help="overrides CAPSNET_MODEL_DIR")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "predict", help="classify image files and folders offline (or with --url, through a running service)"
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files, or folders (recursive)")
    p.add_argument(
        "--preprocess",
        choices=["mnist", "fashion", "none"],
        default=None,
        help="as the service does: mnist for photos and scans of digits, fashion for product photos, none "
        "for 28x28 images as they are; default: the model's own (mnist for the shipped one)",
    )
    p.add_argument(
        "--output", type=Path, default=None, help="a .jsonl or .csv file (default: JSON lines on stdout)"
    )
    p.add_argument(
        "--model-dir", type=Path, default=None, help="default: CAPSNET_MODEL_DIR, else the shipped model"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per inference")
    p.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="threads decoding images while the previous batch is inferred (default 0: decode, then infer)",
    )
    p.add_argument("--url", default=None, help="send the files to the service at this URL instead")
    p.add_argument("--model", default=None, help="with --url: the served model to ask (default: its default)")
    p.add_argument("--concurrency", type=int, default=8, help="with --url: requests at once")
    p.add_argument("--api-key", default=None, help="with --url: bearer key (default: $CAPSNET_API_KEY)")
    p.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and getattr(args, "malloc", None) == "auto":  # the command line, not a caller's list
        from capsnet.model_export.malloc import run_again_under_tcmalloc

        run_again_under_tcmalloc(sys.argv[1:])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.func(args)
