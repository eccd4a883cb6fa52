"""A backend plugin brings its modes with it: a package installed outside this repository (a throwaway one, made
here: its module and a dist-info whose entry_points.txt registers the spec) runs ``dit_quant=int8-<name>``
through ``python -m lightq`` with no file of the core touched. A repository plugin that is not installed keeps
its modes, which name the install command."""

import json
import os
import textwrap

from lightq import config, plan
from lightq.backends import registry
from lightq.hardware import PROFILES

TOY_INIT = '''
from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(name="toyq", schemes={"int8": None}, impl="lightq_toyq.impl:ToyBackend",
                   description="int8 with the activation quantized by lightq's reference and a float64 GEMM")
'''

TOY_IMPL = '''
import torch

from lightq.backends.base import Backend
from lightq.quant.schemes import quantize_activation


class ToyBackend(Backend):
    def pack(self, qw):
        self.check_scheme(qw.scheme)
        return {"codes": qw.data.to(torch.float64), "scale": qw.scale.to(torch.float64)}

    def apply(self, x, packed, scheme, bias):
        x2 = self.flat_input(x, packed["codes"].shape[1], scheme)
        xq, sx = quantize_activation(x2, scheme)
        y = (xq.to(torch.float64) @ packed["codes"].t()) * sx.to(torch.float64) * packed["scale"].t()
        if bias is not None:
            y = y + bias.to(torch.float64)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)
'''


def install_toy_plugin(site):
    """The files ``pip install`` leaves for a package ``lightq-toyq`` with one ``lightq.backends`` entry point."""
    package = site / "lightq_toyq"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(TOY_INIT))
    (package / "impl.py").write_text(textwrap.dedent(TOY_IMPL))
    dist = site / "lightq_toyq-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lightq-toyq\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.GROUP}]\ntoyq = lightq_toyq:SPEC\n")


def test_an_installed_plugin_runs_its_mode_with_no_core_edit(run_lightq, tmp_path):
    site = tmp_path / "site"
    install_toy_plugin(site)
    assert not any("toyq" in name for group in config.QUANT_GROUPS for name in config.yaml_modes(group))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = run_lightq("dit_quant=int8-toyq", "t5_quant=int8-toyq", "model.frames=5", "quality.compare=false",
                      f"hydra.run.dir={tmp_path / 'job'}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    for comp in ("dit", "t5"):
        got = result["components"][comp]
        assert (got["mode"], got["scheme"], got["backend"]) == ("int8-toyq", "int8", "toyq")
        assert got["quantized_layers"] > 0 and "fallback_layers" not in got


def test_a_missing_repository_plugin_keeps_its_modes_and_names_the_install(monkeypatch):
    installed = {name: spec for name, spec in registry.specs().items() if name != "sgl"}
    monkeypatch.setattr(registry, "specs", lambda: installed)
    modes = config.backend_modes()
    assert {"fp8-sgl", "int8-sgl"} <= set(modes)
    p = plan.plan_component("dit", modes["fp8-sgl"], PROFILES["sm90"])
    assert not p.ok and "install: pip install -e 'plugins/lightq-sgl[kernel]'" in p.reason
    assert "dit_quant=fp8-torch" in p.reason and "\n" not in p.reason
