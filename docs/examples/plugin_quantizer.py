"""A quantizer method as a plugin: uniform levels on [0, 1], with what export needs."""

# --8<-- [start:plugin]
# my_quant.py — install with, in your pyproject.toml:
#   [project.entry-points.ewgs_plugins]
#   my_quant = "my_quant"
from ewgs_plugins import Quantizer, QuantizerMethod, hookimpl


class Uniform(Quantizer):  # activations clipped to [0, 1], 2^b levels
    def quantize(self, x):
        steps = 2**self.bits - 1
        return self.round_site(x * steps, steps, 0.0, steps) / steps


class UniformWeights(Uniform):  # weights mapped onto [0, 1] by their largest |w|
    def quantize(self, w):
        m = w.detach().abs().max() + 1e-12
        return (2 * super().quantize(w / (2 * m) + 0.5) - 1) * m


class UniformMethod(QuantizerMethod):
    name = "uniform"

    def weight_quantizer(self, bits):
        return UniformWeights(bits)

    def activation_quantizer(self, bits):
        return Uniform(bits)


@hookimpl
def ewgs_methods():
    return {"uniform": UniformMethod}


# --8<-- [end:plugin]

# --8<-- [start:export]
import torch  # noqa: E402

from ewgs_plugins import IntegerMap  # noqa: E402


class ExportableUniform(Uniform):
    def integer_map(self):  # codes 0..steps, values codes / steps
        steps = 2**self.bits - 1
        return IntegerMap(torch.tensor(1.0 / steps), torch.tensor(0.0), 0, steps)

    def dequantize(self, codes):  # the forward divides by steps: keep its order
        return codes.float() / (2**self.bits - 1)


# --8<-- [end:export]


def main() -> None:
    """Register the plugin in this process and train a small model on the digits with it."""
    from sklearn.datasets import load_digits
    from torch import nn

    from ewgs_plugins import (
        initialize_quantizers,
        quantize_model,
        register_plugin,
        round_sites,
        unregister_plugin,
    )

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    plugin = type("MyQuant", (), {"ewgs_methods": staticmethod(ewgs_methods)})
    register_plugin(plugin, "my_quant")
    try:
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        net.append(nn.Linear(128, 10))
        model = quantize_model(net, "uniform", weight_bits=2, activation_bits=2, backward="ewgs")
        assert set(round_sites(model)) == {"2.weight", "2.input"}  # first and last stay FP
        initialize_quantizers(model, x[:256])
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            batch = torch.randint(0, len(x), (128,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        top1 = (model(x).argmax(1) == y).float().mean().item()
        print(f"uniform W2A2 with EWGS: training top-1 {100 * top1:.1f} %")
        assert top1 > 0.8, top1
    finally:
        unregister_plugin("my_quant")

    quantizer, x = ExportableUniform(3), torch.rand(1000)  # the integer contract:
    codes = quantizer.integer_codes(x)  # the round site's output, 0..7
    assert torch.equal(quantizer.dequantize(codes), quantizer(x))  # decodes bit for bit
    assert torch.allclose(quantizer.integer_map().affine(codes), quantizer(x))  # its map


if __name__ == "__main__":
    main()
