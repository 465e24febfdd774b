"""A fine-tune killed mid-way resumes from the progress it saved (riffloop.loop.FineTuneJournal
through ReleaseCycle.fine_tune): the candidate equals the one an uninterrupted run makes, only
the steps after the last save are taken again, and a save of another run is not resumed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from riffloop.loop import CycleObserver, TrainingProgress
from riffloop.music import MelDataset
from tests.loop.test_release_cycle import Harness, tiny_model, weights_of, windows

pytestmark = pytest.mark.unit

SETTINGS = {"finetune_steps": 10, "batch_size": 4, "steps_per_chunk": 3, "finetune_save_every": 4}


class Killed(Exception):
    """Stands for SIGKILL: raised from inside the fine-tune, nothing runs after it."""


class KillAt(CycleObserver):
    """Records the steps taken and resumes seen; 'kills' the trainer once it reaches ``step``."""

    def __init__(self, step: int | None = None) -> None:
        self.step, self.steps_run, self.resumed_at = step, 0, None

    def progress(self, progress: TrainingProgress) -> None:
        self.steps_run += progress.steps_run
        if self.step is not None and progress.step >= self.step:
            raise Killed(f"killed at step {progress.step}")

    def resumed(self, progress: TrainingProgress) -> None:
        self.resumed_at = progress.step


def parent_in(h: Harness) -> Any:
    parent = tiny_model()
    parent.version = "v0001"
    parent.baseline_index = h.cycle.base_index(parent)
    h.shelf.publish(parent)
    return parent


def data(seed: int = 1) -> MelDataset:
    return MelDataset.from_images(windows(4, seed), torch.tensor([1.0, 0.5, 2.0, 1.0]))


def tune(h: Harness, parent: Any, observer: CycleObserver, data_seed: int = 1) -> Any:
    h.cycle.observer = observer
    return h.cycle.fine_tune(parent, data(data_seed), "v0002", seed=3, trainset_id="set-1")


def test_a_killed_fine_tune_resumes_from_its_last_save_and_ends_where_an_unbroken_one_does():
    whole = Harness(**SETTINGS)
    expected = weights_of(tune(whole, parent_in(whole), KillAt()))
    assert whole.objects.list("models", "finetune/")  # the last step's save, until cleared

    h = Harness(**SETTINGS)
    parent = parent_in(h)
    first = KillAt(step=7)  # chunks end at 3, 4 (a save), 7: killed before the save at 8
    with pytest.raises(Killed):
        tune(h, parent, first)
    assert first.steps_run == 7
    h.cycle = h.restart()  # a new process on the same stores
    second = KillAt()
    candidate = tune(h, parent, second)
    assert (second.resumed_at, second.steps_run) == (4, 6)  # steps 5–10 again, not 1–10
    got = weights_of(candidate)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert candidate.card["training"]["steps"] == 10


def test_a_fine_tune_stopped_by_sigterm_saves_where_it_stopped() -> None:
    h = Harness(**SETTINGS)
    parent = parent_in(h)

    class StopAt(KillAt):
        def progress(self, progress: TrainingProgress) -> None:
            super().progress(progress)
            if progress.step >= 3:
                h.cycle.stopping.set()

    from riffloop.core import Interrupted

    with pytest.raises(Interrupted):
        tune(h, parent, StopAt())
    h.cycle = h.restart()
    again = KillAt()
    tune(h, parent, again)
    assert (again.resumed_at, again.steps_run) == (3, 7)


def test_progress_of_another_run_is_not_resumed() -> None:
    h = Harness(**SETTINGS)
    parent = parent_in(h)
    with pytest.raises(Killed):
        tune(h, parent, KillAt(step=5))  # saved at 4
    other_data = KillAt()
    tune(h, parent, other_data, data_seed=2)  # same set id, other windows: other fingerprint
    assert (other_data.resumed_at, other_data.steps_run) == (None, 10)

    h2 = Harness(**SETTINGS)
    parent2 = parent_in(h2)
    with pytest.raises(Killed):
        tune(h2, parent2, KillAt(step=5))
    h2.shelf.publish(parent2)  # the parent published again: another checkpoint hash
    fresh = KillAt()
    tune(h2, parent2, fresh)
    assert (fresh.resumed_at, fresh.steps_run) == (None, 10)


def test_without_a_training_set_id_or_with_saving_off_nothing_is_saved() -> None:
    h = Harness(**{**SETTINGS, "finetune_save_every": 0})
    parent = parent_in(h)
    h.cycle.fine_tune(parent, data(), "v0002", seed=3, trainset_id="set-1")
    h.cycle.fine_tune(parent, data(), "v0003", seed=3)
    assert h.objects.list("models", "finetune/") == []


def test_the_journal_keeps_one_save_per_set_and_clear_removes_it() -> None:
    h = Harness(**SETTINGS)
    tune(h, parent_in(h), KillAt())
    keys = h.objects.list("models", "finetune/")
    slot = h.cycle.journal.slot("set-1")
    assert sorted(keys) == sorted(
        [
            f"{slot}.json",
            f"{slot}/step-0000010/progress.json",
            f"{slot}/step-0000010/trainer_state.pt",
        ]
    )
    h.cycle.journal.clear("set-1")
    assert h.objects.list("models", "finetune/") == []
