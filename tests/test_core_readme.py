"""The manual's plugin example works as written (a plugin is ten lines)."""

import re
from pathlib import Path

import torch
from torch import nn

from ewgs_plugins import quantize_model, register_plugin, round_sites, unregister_plugin

#: the plugin example of the manual (docs/how-to/write-a-plugin.md includes its sections)
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plugin_quantizer.py"


def example_section(name: str) -> str:
    """The lines between ``# --8<-- [start:name]`` and ``[end:name]``: what the page shows."""
    pattern = rf"# --8<-- \[start:{name}\]\n(.*?)# --8<-- \[end:{name}\]"
    return re.search(pattern, EXAMPLE.read_text(), flags=re.S)[1]


def readme_plugin_source() -> str:
    return example_section("plugin")


def test_the_readme_method_plugin_registers_and_quantizes():
    namespace: dict = {}
    exec(compile(readme_plugin_source(), "README.md", "exec"), namespace)
    plugin = type("ReadmePlugin", (), {"ewgs_methods": staticmethod(namespace["ewgs_methods"])})
    register_plugin(plugin, "readme-example")
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        quantized = quantize_model(
            model, "uniform", weight_bits=2, activation_bits=2, backward="ewgs", delta=0.1
        )
        x = torch.rand(5, 3)
        quantized(x).sum().backward()
        assert set(round_sites(quantized)) == {"2.weight", "2.input"}
        inputs = []
        quantized[2].register_forward_hook(lambda m, i, o: inputs.append(i[0]))
        quantized(x)
        levels = quantized[2].input_quantizer(inputs[0].clamp(0, 1)) * 3
        assert torch.equal(levels, levels.round())
    finally:
        unregister_plugin("readme-example")
