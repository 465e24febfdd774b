"""Where a training process sits among its peers: one process (the default) or a
``torch.distributed`` world started by torchrun (or a Kubeflow PyTorchJob, which sets the same
variables).

The data-parallel scheme (``Trainer`` with a distributed ``TrainingWorld``):

1. Every rank draws the same *global* batch of B indices from the seeded data samplers, and the
   same t_i and ε_i for all B samples from the seeded noise generator, so the random streams,
   the data position and therefore every checkpoint are identical on every rank (and equal to
   a one-process run's: a run may resume on another number of ranks).
2. Rank r keeps the samples at positions r, r + W, r + 2W, … of the global batch (its shard;
   shards differ by at most one sample when W does not divide B).
3. Rank r's loss is L_r = W · Σ_{i ∈ shard r} ω_i w(t_i) ‖target_i − out_i‖² / Σ_{all i} ω_i:
   the denominator is the *global* Σω (known on every rank from step 1), and DDP averages the
   gradients over the W ranks, so (1/W) Σ_r ∇L_r = ∇L of the one-process loss exactly, whatever
   the shard sizes. (Averaging per-rank losses normalised by their own Σω would weight a sample
   by the ω of the others in its shard.)
4. Gradient clipping, the optimiser and the EMA then run on identical gradients on every rank;
   only rank 0 writes checkpoints, and all ranks agree on when to stop.

UNet2DModel normalises with GroupNorm (per sample), so a shard's forward pass computes what the
global batch's would for those samples; a model with BatchNorm would need SyncBatchNorm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from riffloop.core import ValidationError

__all__ = ["TrainingWorld", "init_training_world"]


@dataclass(frozen=True)
class TrainingWorld:
    """This process's place: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValidationError(
                f"training world: rank {self.rank} of {self.world_size} "
                f"(local {self.local_rank}) is not a place"
            )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, exports and logs progress."""
        return self.rank == 0

    def shard(self, batch: int) -> slice:
        """Step 2: this rank's positions in a global batch of ``batch`` samples."""
        return slice(self.rank, batch, self.world_size)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TrainingWorld:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun and the PyTorchJob operator set them;
        none set = one process."""
        env = os.environ if environ is None else environ
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank if world_size > 1 else 0)))
        except ValueError:
            raise ValidationError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)


def init_training_world(
    device: str = "auto", environ: dict[str, str] | None = None, timeout_s: float = 1800.0
) -> tuple[TrainingWorld, torch.device]:
    """The world from the environment and the device this rank trains on. With WORLD_SIZE > 1
    it joins the process group (``env://``: MASTER_ADDR, MASTER_PORT): NCCL on CUDA, each rank
    on ``cuda:LOCAL_RANK``; gloo on the CPU. One process (the default) initialises nothing."""
    from riffloop.music._train import resolve_device

    world = TrainingWorld.from_env(environ)
    if not world.distributed:
        return world, resolve_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{world.local_rank}"
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            init_method="env://",
            rank=world.rank,
            world_size=world.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return world, resolved
