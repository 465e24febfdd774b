"""The simulation around the loop: simulated listeners, the experiment that drives the six
services through their APIs, its report and its command line (design.md §6).

A client of ``riffloop.loop``, whose rules it drives; the domain never imports it. Listener
populations are plug-ins (``--listeners package.module:factory``, docs/LISTENERS.md). Commands:
``python -m riffloop.sim demo|evidence|soak``.

The listeners need only numpy and load at once; the torch-bound parts (the experiment, its report
and CLI, the random-taste population over the audio embedding) load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from riffloop.sim._listeners import (
    FEATURES,
    TASTE_FAMILIES,
    AudioFeatures,
    BurstBot,
    ConstantBot,
    Listener,
    ListenerFactory,
    ListenOutcome,
    RandomBot,
    TasteListener,
    ZeroListenBot,
    audio_features,
    bright_dense_listeners,
    checked_answer,
    dark_sparse_listeners,
    load_listener_factory,
    make_population,
    taste_population,
)

if TYPE_CHECKING:
    from riffloop.sim._cli import demo, evidence
    from riffloop.sim._deployment import EmbeddedDeployment, SimClock
    from riffloop.sim._experiment import (
        InputSong,
        IterationRow,
        LoopConfig,
        LoopExperiment,
        LoopResult,
        load_inputs,
    )
    from riffloop.sim._random_taste import (
        ClipVector,
        RandomTasteListener,
        TasteSpace,
        random_taste_listeners,
        random_taste_population,
    )
    from riffloop.sim._report import format_table, paired_interval
    from riffloop.sim._soak import Flatness, Tolerance, flatness, soak

_LAZY = {
    "ClipVector": "riffloop.sim._random_taste",
    "IterationRow": "riffloop.sim._experiment",
    "LoopConfig": "riffloop.sim._experiment",
    "LoopExperiment": "riffloop.sim._experiment",
    "LoopResult": "riffloop.sim._experiment",
    "EmbeddedDeployment": "riffloop.sim._deployment",
    "Flatness": "riffloop.sim._soak",
    "InputSong": "riffloop.sim._experiment",
    "SimClock": "riffloop.sim._deployment",
    "RandomTasteListener": "riffloop.sim._random_taste",
    "TasteSpace": "riffloop.sim._random_taste",
    "demo": "riffloop.sim._cli",
    "evidence": "riffloop.sim._cli",
    "flatness": "riffloop.sim._soak",
    "format_table": "riffloop.sim._report",
    "load_inputs": "riffloop.sim._experiment",
    "paired_interval": "riffloop.sim._report",
    "random_taste_listeners": "riffloop.sim._random_taste",
    "random_taste_population": "riffloop.sim._random_taste",
    "soak": "riffloop.sim._soak",
    "Tolerance": "riffloop.sim._soak",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'riffloop.sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "FEATURES",
    "TASTE_FAMILIES",
    "AudioFeatures",
    "BurstBot",
    "ClipVector",
    "ConstantBot",
    "EmbeddedDeployment",
    "Flatness",
    "InputSong",
    "IterationRow",
    "ListenOutcome",
    "Listener",
    "ListenerFactory",
    "LoopConfig",
    "LoopExperiment",
    "LoopResult",
    "RandomBot",
    "RandomTasteListener",
    "SimClock",
    "TasteListener",
    "TasteSpace",
    "Tolerance",
    "ZeroListenBot",
    "audio_features",
    "bright_dense_listeners",
    "checked_answer",
    "dark_sparse_listeners",
    "demo",
    "evidence",
    "flatness",
    "format_table",
    "load_inputs",
    "load_listener_factory",
    "make_population",
    "paired_interval",
    "random_taste_listeners",
    "random_taste_population",
    "soak",
    "taste_population",
]
