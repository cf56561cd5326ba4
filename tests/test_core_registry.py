"""The plugin manager: discovery through entry points, name look-ups and their errors."""

import pytest
import torch
from toys import make_distribution

from ewgs_plugins import PluginError, RoundSite, cli, registry
from ewgs_plugins.errors import ConfigError
from ewgs_plugins.options import call_with_options

HALF_STE = """
    from ewgs_plugins import hookimpl
    from ewgs_plugins.backward import BackwardRule


    class HalfStraightThrough(BackwardRule):
        name = "half-ste"

        def __init__(self, factor: float = 0.5):
            self.factor = factor

        def latent_gradient(self, grad, context):
            return grad * self.factor


    @hookimpl
    def ewgs_backward_rules():
        return {"half-ste": HalfStraightThrough}
"""


def test_a_third_party_plugin_is_discovered_and_usable(site_packages, capsys):
    make_distribution(site_packages, "ewgs-half-ste", "ewgs_half_ste", HALF_STE)
    entry = registry().get("backward", "half-ste")
    assert (entry.plugin, entry.distribution) == ("ewgs_half_ste", "ewgs-half-ste")
    rule = registry().create("backward", "half-ste", {"factor": 0.25}, "backward")
    z = torch.tensor([0.4, 1.6], requires_grad=True)
    RoundSite(rule)(z, 3).sum().backward()
    assert torch.equal(z.grad, torch.tensor([0.25, 0.25]))
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "half-ste" in out and "ewgs-half-ste" in out
    assert "plugin core (ewgs-plugins)" in out


def test_built_ins_come_through_the_entry_point_group():
    entries = registry().entries("backward")
    assert {"ste", "ewgs"} <= set(entries)
    assert entries["ewgs"].distribution == "ewgs-plugins"
    assert entries["ewgs"].plugin == "core"


def test_a_name_registered_twice_names_both_plugins(site_packages):
    make_distribution(
        site_packages,
        "ewgs-dupe",
        "ewgs_dupe",
        """
        from ewgs_plugins import hookimpl
        from ewgs_plugins.backward import StraightThrough

        @hookimpl
        def ewgs_backward_rules():
            return {"ste": StraightThrough}
        """,
    )
    with pytest.raises(PluginError) as error:
        registry()
    message = str(error.value)
    assert "backward rule 'ste' is registered twice" in message
    assert "'core' (ewgs-plugins)" in message and "'ewgs_dupe' (ewgs-dupe)" in message


def test_a_plugin_that_fails_to_import_names_itself_and_the_cause(site_packages):
    make_distribution(site_packages, "ewgs-broken", "ewgs_broken", "import not_a_module_anywhere\n")
    with pytest.raises(PluginError) as error:
        registry()
    message = str(error.value)
    assert "plugin 'ewgs_broken' (distribution ewgs-broken" in message
    assert "failed to import" in message and "not_a_module_anywhere" in message


def test_a_plugin_whose_hook_raises_is_named(site_packages):
    make_distribution(
        site_packages,
        "ewgs-raises",
        "ewgs_raises",
        """
        from ewgs_plugins import hookimpl

        @hookimpl
        def ewgs_delta_estimators():
            raise RuntimeError("no estimators today")
        """,
    )
    with pytest.raises(PluginError, match="plugin 'ewgs_raises' failed.*no estimators today"):
        registry()


def test_the_cli_reports_a_broken_plugin_with_status_2(site_packages, capsys):
    make_distribution(site_packages, "ewgs-broken", "ewgs_broken", "raise ImportError('boom')\n")
    assert cli.main(["plugins"]) == 2
    assert "ewgs_broken" in capsys.readouterr().err


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(PluginError, match=r"unknown backward rule 'stee'; known: .*ewgs.*ste"):
        registry().get("backward", "stee")
    with pytest.raises(ConfigError, match=r"^backward\.name: unknown backward rule 'stee'"):
        registry().get("backward", "stee", "backward.name")


def test_options_are_checked_by_name_and_type():
    def factory(rate: float = 1.0, steps: int = 3, enabled: bool = True, mode: str = "a"):
        return (rate, steps, enabled, mode)

    assert call_with_options(factory, {"rate": 2}, "x", what="thing") == (2.0, 3, True, "a")
    with pytest.raises(ConfigError, match=r"^x\.speed: unknown option of thing; known options:"):
        call_with_options(factory, {"speed": 1}, "x", what="thing")
    with pytest.raises(ConfigError, match=r"^x\.steps: expected int, got True"):
        call_with_options(factory, {"steps": True}, "x", what="thing")
    with pytest.raises(ConfigError, match=r"^x\.enabled: expected bool, got 'yes'"):
        call_with_options(factory, {"enabled": "yes"}, "x", what="thing")
    with pytest.raises(ConfigError, match=r"^x: options of thing must be a mapping"):
        call_with_options(factory, [1, 2], "x", what="thing")

    def needs(value: float):
        return value

    with pytest.raises(ConfigError, match=r"^x: thing needs option\(s\): value"):
        call_with_options(needs, {}, "x", what="thing")
