"""Export of trained runs: the int export rebuilds the model bit for bit, the
ONNX model agrees with PyTorch in onnxruntime on the digits test set, the summary reads
each layer, and a method without an integer map is refused by name."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from ewgs_plugins import cli
from ewgs_plugins.errors import ExportError
from ewgs_plugins.export import (
    check_onnx,
    container_dtype,
    export_int,
    export_onnx,
    first_test_images,
    integer_state,
    load_int,
    load_run,
    onnx_ready,
    write_onnx,
)
from ewgs_plugins.quant import (
    IntegerMap,
    Quantizer,
    QuantizerMethod,
    initialize_quantizers,
    quantize_model,
    quantized_layers,
)
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.rundir import LAYER_SUMMARY
from ewgs_plugins.summary import layer_summaries, model_sizes, summary_markdown
from ewgs_plugins.train import Trainer

METHODS = ("interval", "dorefa", "lsq", "profit")
BITS = ("W1A1", "W2A2", "W4A4", "W8A8")


def train_tiny(method: str, bits: str, output: str) -> str:
    """One epoch of the digits demo with a narrow CNN (first/last layers as the method
    trains them: full precision, PROFIT's all quantized), enough steps to learn (test
    top-1 25-55 % instead of chance)."""
    data = {
        "model": {"name": "digits_cnn", "options": {"width": 8}},
        "data": {"name": "digits", "batch_size": 32},
        "method": method,
        "backward": "ste",
        "bits": bits,
        "epochs": 1,
        "optimizers": {
            "weights": {"name": "adam", "lr": 1e-2},
            "quantizer": {"name": "adam", "lr": 1e-3},
        },
        "device": "cpu",
        "output": output,
        "callbacks": {"profit": False},
    }
    Trainer(expand_runs(data, source="test")[0].recipe, progress=False).run()
    return output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    runs: dict[tuple[str, str], str] = {}

    def get(method: str, bits: str) -> str:
        if (method, bits) not in runs:
            path = tmp_path_factory.mktemp(f"{method}{bits}")
            runs[method, bits] = train_tiny(method, bits, str(path / "run"))
        return runs[method, bits]

    return get


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_int_round_trip_is_bit_identical_and_onnxruntime_agrees(
    trained, method: str, bits: str, tmp_path
) -> None:
    run_dir = trained(method, bits)
    run = load_run(run_dir)
    images, _ = first_test_images(run.recipe)
    with torch.no_grad():
        logits = run.model(images)

    path = export_int(run_dir, tmp_path / "int.safetensors")
    with torch.no_grad():
        assert torch.equal(load_int(path)(images), logits)

    onnx_path = export_onnx(run_dir, tmp_path / "model.onnx")
    check = check_onnx(onnx_path, run.model, images)
    assert check.images == len(images) == 359
    assert check.top1_agreement == 1.0, check
    assert check.relative <= 1e-4, check
    # a value on a rounding boundary may land on the other level in the odd image
    assert check.off_images <= 0.01 * check.images, check


def test_the_int_file_holds_codes_in_the_narrowest_dtype_and_no_latent_weights(
    trained, tmp_path
) -> None:
    from safetensors.torch import load_file

    run_dir = trained("lsq", "W4A4")
    path = export_int(run_dir, tmp_path / "lsq.safetensors")
    tensors = load_file(str(path))
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["method"]["name"] == "lsq" and manifest["bits"] == {
        "weights": 4,
        "activations": 4,
    }
    assert manifest["recipe"]["epochs"] == 1
    quantized = {n for n, e in manifest["layers"].items() if "codes" in e["weight"]}
    assert quantized == {"3", "6"}  # digits_cnn's middle convs; first and last stay FP
    for name in quantized:
        entry = manifest["layers"][name]["weight"]
        codes = tensors[entry["codes"]]
        assert codes.dtype == torch.int8 and entry["dtype"] == "int8"
        assert -8 <= int(codes.min()) and int(codes.max()) <= 7
        assert f"{name}.weight" not in tensors  # the codes replace the latent weights
        assert entry["scale"] == pytest.approx(float(tensors[f"{name}.weight.scale"]))
    assert "0.weight" in tensors and "11.weight" in tensors  # full-precision layers


def test_container_dtype_is_the_narrowest_that_holds_the_codes() -> None:
    assert container_dtype(0, 1) == torch.uint8
    assert container_dtype(0, 255) == torch.uint8
    assert container_dtype(-128, 127) == torch.int8
    assert container_dtype(-255, 255) == torch.int16
    assert container_dtype(0, 65535) == torch.uint16
    assert container_dtype(-(2**20), 0) == torch.int32


def test_the_onnx_graph_holds_integer_codes_and_uses_qdq_where_it_is_the_map(
    trained, tmp_path
) -> None:
    import onnx
    from onnx import numpy_helper

    def graph(method: str) -> tuple[set[str], list]:
        path = export_onnx(trained(method, "W2A2"), tmp_path / f"{method}.onnx")
        model = onnx.load(str(path)).graph
        arrays = [numpy_helper.to_array(i) for i in model.initializer]
        codes = [a for a in arrays if a.ndim == 4 and a.dtype.kind in "iu" and a.itemsize == 1]
        return {node.op_type for node in model.node}, codes

    ops, codes = graph("lsq")  # integer zero points, one multiply: QDQ carries the scale
    assert {"QuantizeLinear", "DequantizeLinear", "Round", "Clip"} <= ops and "Div" not in ops
    assert len(codes) == 2 and all(-2 <= c.min() and c.max() <= 1 for c in codes)
    ops, codes = graph("interval")  # the forward's k · (2/steps) − 1: DQ, then Mul, Add
    assert {"QuantizeLinear", "DequantizeLinear", "Mul", "Add"} <= ops and "Div" not in ops
    assert len(codes) == 2 and all(0 <= c.min() and c.max() <= 3 for c in codes)


def test_summary_reads_each_layer(trained, tmp_path, capsys) -> None:
    run_dir = trained("interval", "W2A2")
    written_by_the_trainer = (load_run(run_dir).run_dir / LAYER_SUMMARY).read_text()
    assert (
        "| 3 | interval | 2 | 2 |" in written_by_the_trainer and "smaller" in written_by_the_trainer
    )
    model = load_run(run_dir).model
    layers = quantized_layers(model)
    layers["6"].weight_quantizer.set_bits(4)  # a layer that differs from the recipe
    rows = {row.name: row for row in layer_summaries(model)}
    assert (rows["3"].weight_bits, rows["6"].weight_bits, rows["6"].input_bits) == (2, 4, 2)
    assert rows["0"].weight_bits == 32 and rows["0"].packed_bytes == rows["0"].fp32_bytes
    conv = layers["3"]
    assert rows["3"].parameters == conv.weight.numel() == 8 * 16 * 9
    # 2-bit weights, then scale + zero point of weights and input and |α|, in float32
    assert rows["3"].packed_bytes == conv.weight.numel() * 2 // 8 + 4 * 5
    assert rows["3"].fp32_bytes == 4 * conv.weight.numel()
    fp32, packed = model_sizes(model, rows.values())
    full_precision = load_run(run_dir).recipe.make_model(10).state_dict().values()
    assert fp32 == 4 * sum(t.numel() for t in full_precision if t.is_floating_point())
    assert packed < fp32
    text = summary_markdown(model)
    assert "| 6 | interval | 4 | 2 |" in text and "×" in text

    assert cli.main(["summary", run_dir]) == 0
    printed = capsys.readouterr().out
    assert "| 3 | interval | 2 | 2 |" in printed
    assert (load_run(run_dir).run_dir / LAYER_SUMMARY).read_text() in printed + "\n"


def test_cli_export_int_and_onnx(trained, tmp_path, capsys) -> None:
    run_dir = trained("dorefa", "W2A2")
    out = tmp_path / "d.safetensors"
    assert cli.main(["export", run_dir, "--format", "int", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert cli.main(["export", run_dir, "--format", "onnx", "--out", str(tmp_path / "d.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agrees on 100.00%" in printed


def test_cli_export_of_a_missing_run_is_one_line(tmp_path, capsys) -> None:
    assert cli.main(["export", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint_last.pt: not found" in err


def test_onnx_export_without_the_extra_names_it(trained, monkeypatch, capsys) -> None:
    run_dir = trained("lsq", "W4A4")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert cli.main(["export", run_dir, "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'onnx'" in err and 'pip install "ewgs-plugins[export]"' in err


def test_the_readme_plugin_method_cannot_be_exported_and_says_so() -> None:
    from test_core_readme import readme_plugin_source

    from ewgs_plugins import register_plugin, unregister_plugin

    namespace: dict = {}
    exec(compile(readme_plugin_source(), "README.md", "exec"), namespace)
    plugin = type("ReadmePlugin", (), {"ewgs_methods": staticmethod(namespace["ewgs_methods"])})
    (name,) = namespace["ewgs_methods"]()
    register_plugin(plugin, "readme-example")
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        quantized = quantize_model(model, name, weight_bits=2, activation_bits=2)
        initialize_quantizers(quantized, torch.rand(5, 3))
        message = (
            f"method '{name}' \\(plugin readme-example\\) does not state its integer map "
            ".*; it cannot be exported"
        )
        with pytest.raises(ExportError, match=message):
            integer_state(quantized)
        with pytest.raises(ExportError, match=message):
            onnx_ready(quantized)
        assert "n/a" in summary_markdown(quantized)  # the summary still reads it
    finally:
        unregister_plugin("readme-example")


def test_the_readme_contract_snippet_makes_the_plugin_method_exportable() -> None:
    from test_core_readme import example_section, readme_plugin_source

    namespace: dict = {}
    exec(compile(readme_plugin_source() + example_section("export"), "example", "exec"), namespace)
    exportable = namespace["ExportableUniform"]

    class Method(QuantizerMethod):
        name = "uniform"

        def weight_quantizer(self, bits: int):
            return exportable(bits)

        def activation_quantizer(self, bits: int):
            return exportable(bits)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    quantized = quantize_model(model, Method(), weight_bits=3, activation_bits=3)
    x = torch.rand(64, 3)
    initialize_quantizers(quantized, x)
    tensors, layers = integer_state(quantized)
    assert tensors["2.weight.codes"].dtype == torch.uint8 and layers["2"]["input"]["high"] == 7
    quantizer = quantized[2].weight_quantizer
    weight = quantized[2].weight
    codes = quantizer.integer_codes(weight)
    assert torch.equal(quantizer.dequantize(codes), quantizer(weight))


class PerChannelWeights(Quantizer):
    """A test plugin's quantizer with a step per output channel (``axis`` 0), signed
    4-bit codes; activations per tensor on [0, 1]."""

    def __init__(self, bits: int, channels: int) -> None:
        super().__init__(bits)
        self.step = nn.Parameter(torch.linspace(0.05, 0.2, channels))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step = self.step.view(-1, *([1] * (x.dim() - 1)))
        half = 2 ** (self.bits - 1)
        return self.round_site(x / step, 2 * half - 1, float(-half), float(half - 1)) * step

    def integer_map(self) -> IntegerMap:
        half = 2 ** (self.bits - 1)
        step = self.step.detach().clone()
        return IntegerMap(step, torch.zeros_like(step), -half, half - 1, axis=0)


class UnitInterval(Quantizer):
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        steps = 2**self.bits - 1
        return self.round_site(x * steps, steps, 0.0, float(steps)) * (1.0 / steps)

    def integer_map(self) -> IntegerMap:
        steps = 2**self.bits - 1
        return IntegerMap(torch.tensor(1.0 / steps), torch.tensor(0.0), 0, steps)


class PerChannelMethod(QuantizerMethod):
    name = "per_channel_test"

    def weight_quantizer(self, bits: int) -> Quantizer:
        return PerChannelWeights(bits, 6)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return UnitInterval(bits)


def test_a_per_channel_map_exports_to_onnx_with_an_axis(tmp_path) -> None:
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    x = torch.rand(32, 1, 8, 8)
    model(x)
    quantized = quantize_model(model, PerChannelMethod(), weight_bits=4, activation_bits=4)
    initialize_quantizers(quantized, x)
    weight_q = quantized[2].weight_quantizer
    codes = weight_q.integer_codes(quantized[2].weight)
    assert torch.equal(weight_q.dequantize(codes), weight_q(quantized[2].weight))

    path = write_onnx(quantized.eval(), x[:1], tmp_path / "per_channel.onnx")
    nodes = onnx.load(str(path)).graph.node
    axes = [a.i for n in nodes if n.op_type == "DequantizeLinear" for a in n.attribute]
    assert axes == [0]  # the weight's DQ, per output channel
    check = check_onnx(path, quantized, torch.rand(64, 1, 8, 8))
    assert check.top1_agreement == 1.0 and check.relative <= 1e-6, check


@pytest.mark.parametrize("bits", ["W2A2", "W4A4"])
def test_a_per_channel_lsq_run_exports_its_axis_and_onnxruntime_agrees(bits, tmp_path) -> None:
    import onnx

    method = {"name": "lsq", "options": {"granularity": "per_channel"}}
    run_dir = train_tiny(method, bits, str(tmp_path / "run"))
    run = load_run(run_dir)
    images, _ = first_test_images(run.recipe)
    with torch.no_grad():
        logits = run.model(images)

    path = export_int(run_dir, tmp_path / "int.safetensors")
    manifest = json.loads(path.with_suffix(".json").read_text())
    for name, layer in quantized_layers(run.model).items():
        entry = manifest["layers"][name]["weight"]
        assert entry["axis"] == 0 and len(entry["scale"]) == layer.out_channels
        assert entry["zero_point"] == [0.0] * layer.out_channels
        assert manifest["layers"][name]["input"]["axis"] is None  # activations: per tensor
    with torch.no_grad():
        assert torch.equal(load_int(path)(images), logits)

    onnx_path = export_onnx(run_dir, tmp_path / "model.onnx")
    nodes = onnx.load(str(onnx_path)).graph.node
    weight_axes = [
        a.i
        for n in nodes
        if n.op_type == "DequantizeLinear"
        for a in n.attribute
        if a.name == "axis"
    ]
    assert weight_axes == [0, 0]  # the two quantized convs' weights, per output channel
    check = check_onnx(onnx_path, run.model, images)
    assert check.images == 359 and check.top1_agreement == 1.0, check
    assert check.relative <= 1e-4, check
