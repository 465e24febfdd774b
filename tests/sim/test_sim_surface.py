"""One public surface per package (style rule 8), and the simulation depends on the domain, never
the reverse."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

import riffloop.loop as loop
import riffloop.sim as sim

pytestmark = pytest.mark.unit

_PLUMBING = {"annotations", "importlib", "TYPE_CHECKING", "Any"}


def _public(package: ModuleType) -> set[str]:
    """What the package really offers: its public globals that are not modules or the lazy-load
    plumbing, plus the names it loads on first use."""
    names = {
        n
        for n, v in vars(package).items()
        if not n.startswith("_") and n not in _PLUMBING and not isinstance(v, ModuleType)
    }
    return names | set(vars(package).get("_LAZY", {}))


@pytest.mark.parametrize("package", [loop, sim], ids=["loop", "sim"])
def test_all_lists_exactly_what_the_package_offers(package: ModuleType) -> None:
    assert set(package.__all__) == _public(package)
    assert len(package.__all__) == len(set(package.__all__))
    for name in package.__all__:
        assert getattr(package, name) is not None


def test_the_domain_exports_only_the_loops_rules() -> None:
    simulated = {"TasteListener", "make_population", "LoopExperiment", "demo", "format_table"}
    assert not simulated & set(loop.__all__)
    assert simulated <= set(sim.__all__)


def test_importing_the_domain_loads_no_simulation() -> None:
    probe = (
        "import sys, riffloop.loop as loop\n"
        "[getattr(loop, n) for n in loop.__all__]\n"
        "print(sorted(m for m in sys.modules if m.startswith('riffloop.sim')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
