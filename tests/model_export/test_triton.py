"""`capsnet triton` / `capsnet export --triton`: the config.pbtxt parses as Triton's ModelConfig and
describes the real ONNX file.

The checks read the ONNX file with the `onnx` package and map its types through tritonclient, both
independent of the writer (which reads it with onnxruntime). The ModelConfig message is tritonclient's
own generated model_config_pb2; it is loaded from its file because `import tritonclient.grpc` needs
grpcio, whose [grpc] extra would pin protobuf < 7 under onnx and onnxruntime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from capsnet.cli import main as capsnet_main
from capsnet.model_export.triton import TritonExportError, TritonOptions, to_pbtxt, write_repository
from tests.tools import skip_unless_ci

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "capsnet-mnist"
_PB2: list[ModuleType] = []


def model_config_pb2() -> ModuleType:
    if _PB2:
        return _PB2[0]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        skip_unless_ci("tritonclient is not installed (pip install 'tritonclient[http]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    _PB2.append(module)
    return module


def parse_config(path: Path) -> Any:
    pb2 = model_config_pb2()
    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def onnx_io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, Triton type, dims without the batch axis) of the graph's inputs and outputs, via `onnx`."""
    from tritonclient.utils import np_to_triton_dtype

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(vi: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
        t = vi.type.tensor_type
        dims = t.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value, f"{vi.name}: batch axis is not symbolic"
        np_type = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        return vi.name, "TYPE_" + np_to_triton_dtype(np_type), [d.dim_value for d in dims[1:]]

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_against_onnx(config: Any, onnx_path: Path, max_batch: int) -> None:
    pb2 = model_config_pb2()
    inputs, outputs = onnx_io(onnx_path)
    got_in = [(i.name, pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input]
    got_out = [(o.name, pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output]
    assert got_in == inputs
    assert got_out == outputs
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == max_batch
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    # Warm-up: zeros of every input at B = 1 and B = max_batch_size, with the input's real dims.
    assert [w.batch_size for w in config.model_warmup] == sorted({1, max_batch})
    for w in config.model_warmup:
        assert sorted(w.inputs) == sorted(name for name, _, _ in inputs)
        for name, dtype, dims in inputs:
            assert list(w.inputs[name].dims) == dims
            assert pb2.DataType.Name(w.inputs[name].data_type) == dtype
            assert w.inputs[name].zero_data


@pytest.fixture(params=["shipped", "tiny"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return SHIPPED if request.param == "shipped" else request.getfixturevalue("tiny_model_dir")


def test_config_describes_the_onnx_file(model_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    written = write_repository(model_dir, repo)
    assert [w["name"] for w in written] == ["capsnet", "capsnet_decoder"]
    assert sorted(p.name for p in repo.iterdir()) == ["capsnet", "capsnet_decoder"]

    pb2 = model_config_pb2()
    for name, source in (("capsnet", "capsnet.onnx"), ("capsnet_decoder", "decoder.onnx")):
        model = repo / name / "1" / "model.onnx"
        assert sha256(model) == sha256(model_dir / source)
        config = parse_config(repo / name / "config.pbtxt")
        assert config.name == name
        check_against_onnx(config, model, max_batch=64)
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [(g.kind, g.count) for g in config.instance_group] == [(pb2.ModelInstanceGroup.KIND_GPU, 1)]

    # The classifier's labels, for Triton's classification extension, in output order.
    config = parse_config(repo / "capsnet" / "config.pbtxt")
    labels_meta = json.loads(
        {p.key: p.value for p in onnx.load(str(model_dir / "capsnet.onnx")).metadata_props}["labels"]
    )
    (probabilities,) = [o for o in config.output if o.name == "probabilities"]
    assert probabilities.label_filename == "labels.txt"
    assert (repo / "capsnet" / "labels.txt").read_text().splitlines() == labels_meta
    assert list(probabilities.dims) == [len(labels_meta)] == [10]


def test_config_dims_are_what_the_model_returns(tmp_path: Path) -> None:
    """Run the repository's copy at B = 3: every output is (3, *dims of its config entry)."""
    write_repository(SHIPPED, tmp_path)
    config = parse_config(tmp_path / "capsnet" / "config.pbtxt")
    assert [list(o.dims) for o in config.output] == [[10], [10, 16], [3, 1152, 10], [1152]]
    sess = ort.InferenceSession(
        str(tmp_path / "capsnet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (image,) = config.input
    results = sess.run([o.name for o in config.output], {image.name: np.zeros((3, *image.dims), np.float32)})
    assert [r.shape for r in results] == [(3, *o.dims) for o in config.output]


def test_cli_options_reach_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    capsnet_main(
        [
            "triton",
            str(SHIPPED),
            "--output",
            str(repo),
            "--name",
            "digits",
            "--max-batch-size",
            "8",
            "--max-queue-delay-us",
            "500",
            "--instance-kind",
            "cpu",
            "--instances",
            "2",
            "--version",
            "3",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in report["models"]] == ["digits", "digits_decoder"]
    pb2 = model_config_pb2()
    for name in ("digits", "digits_decoder"):
        assert (repo / name / "3" / "model.onnx").is_file()
        config = parse_config(repo / name / "config.pbtxt")
        assert config.name == name
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.kind, g.count) for g in config.instance_group] == [(pb2.ModelInstanceGroup.KIND_CPU, 2)]
        assert [w.batch_size for w in config.model_warmup] == [1, 8]


def test_export_triton_flag_writes_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`capsnet export CKPT --triton REPO` writes the repository from what it just exported (the export
    itself is replaced by a copy of the shipped model: it has its own tests)."""
    import capsnet.model_export.export as export_mod

    def fake_export(checkpoint: Path, output: Path, *, name: str) -> dict[str, Any]:
        output.mkdir(parents=True)
        for f in ("capsnet.onnx", "decoder.onnx"):
            (output / f).write_bytes((SHIPPED / f).read_bytes())
        return {"parity_max_abs_diff": {}, "metadata": {}}

    monkeypatch.setattr(export_mod, "export", fake_export)
    out, repo = tmp_path / "model", tmp_path / "repo"
    capsnet_main(["export", "ckpt.pt", "--output", str(out), "--no-card", "--triton", str(repo)])
    config = parse_config(repo / "capsnet" / "config.pbtxt")
    check_against_onnx(config, repo / "capsnet" / "1" / "model.onnx", max_batch=64)
    assert sha256(repo / "capsnet_decoder" / "1" / "model.onnx") == sha256(SHIPPED / "decoder.onnx")


def test_needs_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from capsnet.cli import main\n"
        f"main(['triton', {str(SHIPPED)!r}, '--output', {str(tmp_path)!r}])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "capsnet" / "config.pbtxt").is_file()


def test_pbtxt_strings_are_escaped() -> None:
    name = 'a "quoted" \\ name\nwith a newline'
    config = text_format.Parse(
        to_pbtxt({"name": name, "max_batch_size": 4}), model_config_pb2().ModelConfig()
    )
    assert config.name == name
    assert config.max_batch_size == 4


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(TritonExportError, match=r"no capsnet\.onnx"):
        write_repository(tmp_path, tmp_path / "repo")
    with pytest.raises(TritonExportError, match="model name"):
        write_repository(SHIPPED, tmp_path / "repo", name="../escape")
    with pytest.raises(TritonExportError, match="max_batch_size"):
        TritonOptions(max_batch_size=0)
    # A graph whose first axis is fixed cannot be batched by Triton.
    fixed = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "fixed",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    fixed.ir_version = 8
    (tmp_path / "m").mkdir()
    onnx.save(fixed, str(tmp_path / "m" / "capsnet.onnx"))
    with pytest.raises(TritonExportError, match="dynamic batch axis"):
        write_repository(tmp_path / "m", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
