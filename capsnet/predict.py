"""`capsnet predict PATH...`: classify image files and folders, one output row per file.

Offline by default: the files go through the service's own preprocessing (`preprocess_bytes`) and its
onnxruntime engine, in batches, on the serving install alone (no torch, no server). With `--url` the
files are sent to a running service instead, one request per file, several at once; the rows are the
same. Rows come out in input order: a folder is walked recursively, its image files sorted by path.

A row is {"file", "class_index", "label", "probability", "probabilities"} (the ten capsule lengths,
as /predict answers them), or {"file", "error"} for a file that cannot be read, decoded or classified;
the command goes on and exits 1 when any row is an error. Output: JSON lines on stdout, or `--output
FILE` (.jsonl, or .csv for a table with one column per class).
"""

from __future__ import annotations

import csv
import http.client
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit

import numpy as np
import orjson

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
HANDFUL = 8  # more files than this get a progress bar (when stderr is a terminal)
RETRIES = 5  # a 503 (queue full) or a dropped connection is retried this often per file

Row = dict[str, Any]
T = TypeVar("T")


class PredictError(RuntimeError):
    """The whole run cannot go on (no model, no server, a bad option); the message says why."""


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders walked recursively for image files (by suffix), sorted by path.

    A path that does not exist is kept: it gets an error row like any unreadable file."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            found.append(path)
    return found


def _batched(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


# ---------------------------------------------------------------------------------------- offline


class LocalClassifier:
    """The service's preprocessing and onnxruntime engine, in this process.

    Images are decoded by `decode_threads` threads, up to two batches ahead of the one being inferred
    (onnxruntime releases the GIL; Pillow's decoders and numpy do for part of their work); 0 decodes in
    the calling thread, with no overlap. 0 is the default: on cores shared with other work decode threads
    measured no faster, for a little more CPU time."""

    def __init__(
        self,
        model_dir: Path | None,
        preprocess: Literal["mnist", "fashion", "none"] | None,
        batch_size: int,
        decode_threads: int,
    ) -> None:
        from capsnet.service.engine import Engine, EngineError
        from capsnet.service.settings import Settings

        # CAPSNET_* apply as they do to the service: providers, precision, threads, the pixel limit.
        self.settings = Settings()
        try:
            self.engine = Engine.from_settings(self.settings, model_dir)
        except EngineError as exc:
            raise PredictError(str(exc)) from None
        self.labels = self.engine.info.labels
        self.preprocess = preprocess or self.engine.info.preprocess  # default: the model's own
        self.batch_size, self.decode_threads = batch_size, decode_threads

    def _load(self, path: Path) -> np.ndarray | str:
        from capsnet.service.preprocess import PreprocessError, preprocess_bytes

        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"cannot read the file: {exc.strerror or exc}"
        try:
            return preprocess_bytes(data, mode=self.preprocess, max_pixels=self.settings.max_image_pixels)
        except PreprocessError as exc:
            return exc.detail

    def _rows(self, chunk: Sequence[Path], loaded: list[np.ndarray | str]) -> Iterator[Row]:
        good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
        if good:
            images = np.stack([loaded[i] for i in good])[:, None]  # (B, 1, 28, 28)
            probs = self.engine.classify(images, ["probabilities"])["probabilities"]  # (B, classes)
        at = {i: k for k, i in enumerate(good)}
        for i, path in enumerate(chunk):
            item = loaded[i]
            if isinstance(item, str):
                yield {"file": str(path), "error": item}
                continue
            p = probs[at[i]]  # (classes,) float32
            c = int(p.argmax())
            label = self.labels[c]
            yield {
                "file": str(path),
                "class_index": c,
                "label": label,
                "probability": p[c],
                "probabilities": p,
            }

    def rows(self, files: Sequence[Path]) -> Iterator[Row]:
        chunks = list(_batched(files, self.batch_size))
        if self.decode_threads == 0:
            for chunk in chunks:
                yield from self._rows(chunk, [self._load(p) for p in chunk])
            return
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="capsnet-decode") as pool:
            window: deque[tuple[Sequence[Path], list[Future[np.ndarray | str]]]] = deque()
            for chunk in chunks:
                window.append((chunk, [pool.submit(self._load, p) for p in chunk]))
                if len(window) > 2:
                    done, futures = window.popleft()
                    yield from self._rows(done, [f.result() for f in futures])
            for done, futures in window:
                yield from self._rows(done, [f.result() for f in futures])


# ---------------------------------------------------------------------------------------- --url


class _Client:
    """One keep-alive HTTP connection per thread to the service at `url` (standard library only)."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 60.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PredictError(f"--url {url!r} is not an http(s) URL")
        self.scheme, self.netloc, self.base = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.where = f"{self.scheme}://{self.netloc}{self.base}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.local = threading.local()
        self.lock = threading.Lock()
        self.open: list[http.client.HTTPConnection] = []  # every thread's, to close at the end

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self.local.conn = cls(self.netloc, timeout=self.timeout)
            with self.lock:
                self.open.append(conn)
        return conn

    def close(self) -> None:
        with self.lock:
            for conn in self.open:
                conn.close()
            self.open.clear()
            self.local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body); a 503 (queue full) and a dropped connection are retried, OSError at last."""
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"  # the service sniffs the format
        for attempt in range(RETRIES + 1):
            conn = self._connection()
            try:
                conn.request(method, self.base + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError) as exc:
                conn.close()  # a keep-alive connection the server closed, or a server that went away
                self.local.conn = None
                if attempt == RETRIES:
                    raise OSError(f"{type(exc).__name__}: {exc}") from None
                time.sleep(min(0.05 * 2**attempt, 1.0))
                continue
            if response.status == 503 and attempt < RETRIES:
                retry_after = response.headers.get("Retry-After", "1")
                time.sleep(min(float(retry_after) if retry_after.isdigit() else 1.0, 5.0))
                continue
            return response.status, data
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> Any:
        try:
            status, body = self.request("GET", path)
        except OSError as exc:
            raise PredictError(f"cannot reach the service at {self.where}: {exc}") from None
        if status != 200:
            raise PredictError(
                f"the service at {self.where} answers {_error_text(status, body)} to GET {path}"
            )
        return orjson.loads(body)


def _error_text(status: int, body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    detail = (doc.get("detail") or doc.get("error")) if isinstance(doc, dict) else None
    text = detail if isinstance(detail, str) else body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text or 'no detail'}"


class RemoteClassifier:
    """A running service: one POST /predict per file (the raw bytes), `concurrency` at once."""

    def __init__(
        self,
        url: str,
        preprocess: str | None,
        concurrency: int,
        api_key: str | None,
        model: str | None = None,
    ) -> None:
        self.client = _Client(url, api_key)
        # the service's own defaults (its default model, that model's preprocessing) for what is not given
        params = {k: v for k, v in (("model", model), ("preprocess", preprocess)) if v is not None}
        self.query = f"?{urlencode(params)}" if params else ""
        model_query = f"?{urlencode({'model': model})}" if model is not None else ""
        try:
            self.client.get_json("/health/ready")
            self.labels: list[str] = self.client.get_json(f"/metadata{model_query}")["labels"]
        finally:
            self.client.close()
        self.concurrency = concurrency

    def _one(self, path: Path) -> Row:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return {"file": str(path), "error": f"cannot read the file: {exc.strerror or exc}"}
        try:
            status, body = self.client.request("POST", f"/predict{self.query}", data)
        except OSError as exc:
            return {"file": str(path), "error": f"request failed: {exc}"}
        if status != 200:
            return {"file": str(path), "error": _error_text(status, body)}
        item = orjson.loads(body)["predictions"][0]
        keys = ("class_index", "label", "probability", "probabilities")
        return {"file": str(path)} | {k: item[k] for k in keys}

    def rows(self, files: Sequence[Path]) -> Iterator[Row]:
        depth = 2 * self.concurrency  # requests started ahead of the row being written
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="capsnet-client") as pool:
                window: deque[Future[Row]] = deque()
                for path in files:
                    window.append(pool.submit(self._one, path))
                    if len(window) > depth:
                        yield window.popleft().result()
                for future in window:
                    yield future.result()
        finally:
            self.client.close()


# ---------------------------------------------------------------------------------------- output


class Writer:
    """JSON lines, or CSV: file, class_index, label, probability, probability_<label> per class, error."""

    def __init__(self, stream: IO[str], fmt: Literal["jsonl", "csv"], labels: Sequence[str]) -> None:
        self.stream, self.fmt, self.classes = stream, fmt, len(labels)
        self.csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None:
            columns = [f"probability_{label}" for label in labels]
            self.csv.writerow(["file", "class_index", "label", "probability", *columns, "error"])

    def write(self, row: Row) -> None:
        if self.csv is None:
            self.stream.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
        elif "error" in row:
            self.csv.writerow([row["file"], "", "", "", *[""] * self.classes, row["error"]])
        else:
            ps = [str(p) for p in row["probabilities"]]  # float32: its shortest repr, as the service's JSON
            self.csv.writerow(
                [row["file"], row["class_index"], row["label"], str(row["probability"]), *ps, ""]
            )


class Progress:
    """A one-line bar on stderr, redrawn at most 10 times a second, and a closing summary line."""

    def __init__(self, total: int, stream: IO[str], bar: bool) -> None:
        self.total, self.stream, self.bar = total, stream, bar
        self.done = self.failed = 0
        self.start = self.last = time.perf_counter()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.perf_counter()
        if self.bar and (now - self.last >= 0.1 or self.done == self.total):
            self.last = now
            filled = 30 * self.done // max(self.total, 1)
            rate = self.done / max(now - self.start, 1e-9)
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} files, "
                f"{self.failed} failed, {rate:.0f} images/s"
            )
            self.stream.flush()

    def close(self) -> None:
        seconds = time.perf_counter() - self.start
        self.stream.write(
            ("\n" if self.bar and self.done else "")
            + f"capsnet predict: {self.done} file{'' if self.done == 1 else 's'}, "
            f"{self.done - self.failed} classified, "
            f"{self.failed} failed, in {seconds:.2f} s ({self.done / max(seconds, 1e-9):.0f} images/s)\n"
        )
        self.stream.flush()


# ---------------------------------------------------------------------------------------- command


def _output_format(path: Path | None) -> Literal["jsonl", "csv"]:
    if path is None or path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix.lower() == ".csv":
        return "csv"
    raise PredictError(f"--output {path}: use a .jsonl or a .csv file name")


def predict(
    paths: Sequence[Path],
    *,
    output: Path | None,
    preprocess: Literal["mnist", "fashion", "none"] | None,
    model_dir: Path | None,
    batch_size: int,
    decode_threads: int,
    url: str | None,
    model: str | None,
    concurrency: int,
    api_key: str | None,
    stdout: IO[str],
    stderr: IO[str],
) -> int:
    """Run `capsnet predict`; returns the exit status (0: every file classified, 1: some failed)."""
    fmt = _output_format(output)
    for flag, value, least in (
        ("--batch-size", batch_size, 1),
        ("--decode-threads", decode_threads, 0),
        ("--concurrency", concurrency, 1),
    ):
        if value < least:
            raise PredictError(f"{flag} must be at least {least}")
    files = find_files(paths)
    if not files:
        raise PredictError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}"
        )
    classifier: LocalClassifier | RemoteClassifier
    if url:
        api_key = api_key or os.environ.get("CAPSNET_API_KEY") or None
        classifier = RemoteClassifier(url, preprocess, concurrency, api_key, model)
    elif model is not None:
        raise PredictError("--model names a model of the service at --url; offline, use --model-dir")
    else:
        classifier = LocalClassifier(model_dir, preprocess, batch_size, decode_threads)
    try:
        out: IO[str] = stdout if output is None else output.open("w", newline="")
    except OSError as exc:
        raise PredictError(f"--output {output}: {exc.strerror or exc}") from None
    try:
        writer = Writer(out, fmt, classifier.labels)
        progress = Progress(len(files), stderr, bar=len(files) > HANDFUL and stderr.isatty())
        for row in classifier.rows(files):
            writer.write(row)
            progress.update("error" in row)
        progress.close()
    finally:
        if out is not stdout:
            out.close()
    return 1 if progress.failed else 0
