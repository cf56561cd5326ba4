"""Full-precision weights by name: fetched into the hub cache, verified, never loaded
when damaged; every failure one line. No network: file:// URLs and stubbed openers."""

from __future__ import annotations

import hashlib
import http.client
import io
import urllib.error
from pathlib import Path

import pytest
import torch

from ewgs_plugins import ConfigError, hookimpl, models, register_plugin, unregister_plugin, weights
from ewgs_plugins.weights import PublishedWeights, fetch


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub folder in a temporary directory; the cache is ``hub/checkpoints``."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def akamaster_file(folder: Path, name: str = "resnet20-00000000.th") -> tuple[Path, str, dict]:
    """A ResNet-20 file in the akamaster repository's format: the legacy (non-zip)
    torch.save of ``{'best_prec1': float, 'state_dict': {'module.<key>': tensor}}``.
    Returns the file, its SHA-256 and the state_dict saved (without the prefix)."""
    torch.manual_seed(0)
    state = models.resnet20().state_dict()
    saved = {"best_prec1": 91.73, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(saved, path, _use_new_zipfile_serialization=False)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def no_network(url: str):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


class Response(io.BytesIO):
    """What urlopen returns, for a stubbed opener: a body and its headers."""

    def __init__(self, body: bytes, length: int | None = None) -> None:
        super().__init__(body)
        self.headers = {} if length is None else {"Content-Length": str(length)}


def test_download_verifies_and_caches_the_file(tmp_path, hub):
    source, digest, _ = akamaster_file(tmp_path / "server")
    got = fetch(source.as_uri(), digest, progress=False)
    assert got == hub / source.name
    assert got.read_bytes() == source.read_bytes()
    assert [p.name for p in hub.iterdir()] == [source.name]  # no temporary file left


def test_prefix_checksum_as_in_the_file_name(tmp_path, hub):
    source, digest, _ = akamaster_file(tmp_path / "server")
    assert fetch(source.as_uri(), digest[:8], progress=False).is_file()


def test_mismatch_on_download_keeps_nothing(tmp_path, hub):
    source, digest, _ = akamaster_file(tmp_path / "server")
    wrong = "0" * 64 if not digest.startswith("0") else "1" * 64
    with pytest.raises(ConfigError) as error:
        fetch(source.as_uri(), wrong, progress=False)
    text = one_line(error)
    assert text.startswith("model.weights: checksum mismatch")
    assert source.as_uri() in text and str(hub / source.name) in text
    assert list(hub.iterdir()) == []


def test_damaged_cached_file_is_never_loaded(tmp_path, hub, monkeypatch):
    source, digest, _ = akamaster_file(tmp_path / "server")
    hub.mkdir(parents=True)
    damaged = hub / source.name
    damaged.write_bytes(source.read_bytes()[:-100])
    register_plugin(_Plugin(PublishedWeights(source.as_uri(), digest, "resnet20")), "toy-weights")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    try:
        with pytest.raises(ConfigError) as error:
            models.load_full_precision(models.resnet20(), "toy-resnet20")
    finally:
        unregister_plugin("toy-weights")
    text = one_line(error)
    assert "checksum mismatch" in text and str(damaged) in text and source.as_uri() in text
    assert loads == []
    assert damaged.is_file()  # the user's file is left for them to look at


def test_partial_download_short_body(hub):
    body = b"x" * 1000
    with pytest.raises(ConfigError) as error:
        fetch(
            "https://example.org/w/net-12345678.pth",
            hashlib.sha256(body).hexdigest(),
            opener=lambda url: Response(body[:600], length=1000),
            progress=False,
        )
    text = one_line(error)
    assert "partial download: 600 of 1000 bytes" in text
    assert "https://example.org/w/net-12345678.pth" in text
    assert str(hub / "net-12345678.pth") in text
    assert list(hub.iterdir()) == []


def test_partial_download_broken_connection(hub):
    class Broken(Response):
        def read(self, size: int = -1) -> bytes:
            raise http.client.IncompleteRead(b"y" * 300, 700)

    with pytest.raises(ConfigError) as error:
        fetch(
            "https://example.org/w/net-12345678.pth",
            "12345678",
            opener=lambda url: Broken(b"", length=1000),
            progress=False,
        )
    assert "partial download: 300 bytes" in one_line(error)
    assert list(hub.iterdir()) == []


def test_offline_without_the_file_is_one_line(hub):
    url = "https://example.org/w/net-12345678.pth"
    with pytest.raises(ConfigError) as error:
        fetch(url, "12345678", opener=no_network, progress=False)
    text = one_line(error)
    assert text.startswith(f"model.weights: cannot download {url} (URLError")
    assert f"put it at {hub / 'net-12345678.pth'}" in text


def test_cached_file_is_used_offline(tmp_path, hub):
    source, digest, state = akamaster_file(tmp_path / "server", "net-abcdef12.th")
    hub.mkdir(parents=True)
    (hub / source.name).write_bytes(source.read_bytes())
    url = "https://example.org/w/net-abcdef12.th"
    assert fetch(url, digest, opener=no_network, progress=False) == hub / source.name


class _Plugin:
    def __init__(self, published: PublishedWeights) -> None:
        self.published = published

    @hookimpl
    def ewgs_weights(self):
        return {"toy-resnet20": self.published}


def test_plugin_name_loads_the_akamaster_format(tmp_path, hub):
    source, digest, state = akamaster_file(tmp_path / "server")
    register_plugin(_Plugin(PublishedWeights(source.as_uri(), digest, "resnet20")), "toy-weights")
    try:
        weights.check("toy-resnet20")
        model = models.resnet20()
        models.load_full_precision(model, "toy-resnet20")
    finally:
        unregister_plugin("toy-weights")
    assert (hub / source.name).is_file()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_unknown_name_lists_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError) as error:
        weights.check("resnet21", "model.weights")
    text = one_line(error)
    assert text.startswith("model.weights: file not found: resnet21")
    assert "resnet20" in text and "mobilenet_v2" in text


def test_built_in_names_fit_their_models():
    """Each built-in name fits a registered model, and the file name of each URL carries
    the first 8 hex digits of its checksum."""
    from ewgs_plugins.registry import registry

    reg = registry()
    for name, entry in reg.entries("weights").items():
        published = entry.factory
        assert published.model in reg.names("model"), name
        assert f"-{published.sha256[:8]}." in published.file_name, name


@pytest.mark.parametrize("depth", [32, 44, 56, 110])
def test_cifar_depths_have_the_published_sizes(depth):
    """ResNet-6n+2 parameter counts as published (0.46 M ... 1.7 M)."""
    expected = {32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}[depth]
    built = models.CIFAR_RESNETS[f"resnet{depth}"]()
    count = sum(p.numel() for p in built.parameters())
    assert abs(count - expected) / expected < 0.02
