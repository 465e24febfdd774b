"""A fine-tune's progress in the object store, so that a trainer killed mid-way resumes it
(style.md §12: a checkpoint resumes exactly) instead of training the set again from step 0.

Every ``save_every`` steps, when a stop is requested, and once the last step is taken, the
cycle saves ``riffloop.music.Trainer.state_dict(trainable_only=True)`` — the LoRA adapters (or
every weight of a full fine-tune), their EMA, the AdamW moments, the learning-rate schedule,
the step, the noise generator and the data samplers' positions, and the identity a resume must
match (architecture, mel, config, the training data's and the replay's fingerprints) — with the
``FineTuneProgress`` that names what it belongs to: the training set, the candidate version
and the parent it is trained from, with the parent checkpoint's content hash (the frozen
weights the adapters were learnt on).

Layout, in the models bucket, one slot per training set (``slot`` = sha256 of its id):

- ``finetune/<slot>/step-<step>/trainer_state.pt`` and ``…/progress.json``, written first;
- ``finetune/<slot>.json``, the pointer (``ObjectStore.publish_artifact``), written last: a save
  cut short by a crash or a store outage leaves the previous save in force;
- older step folders are deleted after the pointer moved.

A resume reads the pointer, checks every part against it (sha256 of the bytes read), and takes
the save only if it names the same training set, version, parent and parent checkpoint and the
trainer accepts its identity; otherwise the fine-tune starts from step 0 and says why. The
slot is cleared once the candidate is stored (or rejected).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from riffloop.core import (
    ChecksumMismatchError,
    ConflictError,
    NotFoundError,
    ObjectStore,
    ValidationError,
    sha256_hex,
)

_log = logging.getLogger("riffloop.trainer")

PROGRESS_PREFIX = "finetune/"
STATE_PART = "trainer_state.pt"
PROGRESS_PART = "progress.json"


@dataclass(frozen=True)
class FineTuneProgress:
    """What a saved fine-tune state belongs to, and how far it got."""

    trainset_id: str
    version: str  # the candidate's version
    parent: str
    parent_checkpoint: str  # sha256 of the parent's checkpoint pointer (its content hash)
    step: int
    total_steps: int

    def same_run(self, other: FineTuneProgress) -> bool:
        """Whether ``other`` continues this fine-tune (all but the step count agree)."""
        mine, theirs = asdict(self), asdict(other)
        return all(mine[k] == theirs[k] for k in mine if k != "step")


class FineTuneJournal:
    """Saves and finds the progress of the fine-tunes of ``objects``'s models bucket."""

    def __init__(self, objects: ObjectStore, bucket: str = "models") -> None:
        self.objects = objects
        self.bucket = bucket

    @staticmethod
    def slot(trainset_id: str) -> str:
        return PROGRESS_PREFIX + sha256_hex(trainset_id.encode())[:32]

    def save(self, progress: FineTuneProgress, trainer: Any) -> None:
        """Write ``trainer``'s state at ``progress.step``, then move the pointer to it."""
        import torch

        buffer = io.BytesIO()
        torch.save(trainer.state_dict(trainable_only=True), buffer)
        slot = self.slot(progress.trainset_id)
        folder = f"{slot}/step-{progress.step:07d}"
        parts = {
            STATE_PART: buffer.getvalue(),
            PROGRESS_PART: json.dumps(asdict(progress), sort_keys=True).encode(),
        }
        self.objects.publish_artifact(self.bucket, folder, parts, slot + ".json")
        for key in self.objects.list(self.bucket, slot + "/"):
            if not key.startswith(folder + "/"):
                self.objects.delete(self.bucket, key)
        _log.info(
            "fine-tune progress saved",
            extra={"model_version": progress.version, "step": progress.step},
        )

    def resume(self, expected: FineTuneProgress, trainer: Any) -> int:
        """Load the saved state of ``expected``'s fine-tune into ``trainer`` (built from the
        same parent, data and config); returns the step it resumes at, 0 when there is nothing
        to resume (none saved, or a save of another run, unreadable or refused by the
        trainer). A store outage raises (TransientError): the event is retried."""
        import torch

        slot = self.slot(expected.trainset_id)
        try:
            parts = self.objects.read_artifact(self.bucket, slot + ".json")
        except NotFoundError:
            return 0
        except (ChecksumMismatchError, ValidationError) as exc:
            _log.warning("fine-tune progress unreadable; starting again", extra={"why": exc.reason})
            return 0
        try:
            saved = FineTuneProgress(**json.loads(parts[PROGRESS_PART]))
        except (KeyError, TypeError, ValueError) as exc:
            _log.warning("fine-tune progress malformed; starting again", extra={"why": str(exc)})
            return 0
        if not saved.same_run(expected):
            _log.warning(
                "fine-tune progress belongs to another run; starting again",
                extra={"saved": asdict(saved), "model_version": expected.version},
            )
            return 0
        try:
            state = torch.load(io.BytesIO(parts[STATE_PART]), weights_only=True, map_location="cpu")
            trainer.load_state_dict(state)
        except ConflictError as exc:  # another architecture, config or training data
            _log.warning(
                "fine-tune progress does not fit; starting again", extra={"why": exc.reason}
            )
            return 0
        if trainer.step_count != saved.step:
            raise ConflictError(f"progress says step {saved.step}, its state {trainer.step_count}")
        _log.info(
            "fine-tune resumed",
            extra={"model_version": expected.version, "step": saved.step, "of": saved.total_steps},
        )
        return saved.step

    def clear(self, trainset_id: str) -> None:
        """Forget the progress of ``trainset_id``'s fine-tune (its candidate is stored)."""
        slot = self.slot(trainset_id)
        self.objects.delete(self.bucket, slot + ".json")  # the pointer first: no half slot
        for key in self.objects.list(self.bucket, slot + "/"):
            self.objects.delete(self.bucket, key)
