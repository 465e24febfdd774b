"""The baseline z0: the training latent most similar to the merged latent z_agg.

The paper plays, blind and for a quarter of requests, the *baseline* z0 = argmax_{z ∈ Z_train}
Γ(z_agg, z) instead of a generation, so every input has a reference its generations must beat
(design.md §3). Γ is pluggable; the default is cosine similarity of the flattened latents,
Γ(a, b) = ⟨a, b⟩ / (‖a‖‖b‖) — the angle is what the spherical merge controls, the norm is ≈ √D for
every latent and carries no identity.

Every Γ offered here is a bilinear form after two feature maps, Γ(a, b) = ⟨φ_q(a), φ_r(b)⟩, so
the search is one matrix product of the query features with the pre-computed row features:

- cosine: φ_q = φ_r = x/‖x‖ (rows stored in float16 by default: 2 bytes × D per song,
  ≈ 0.8 GB for 100k × 4096; unit-vector entries lose ≈ 1e-3 relative precision, so cosines are
  exact to ≈ 1e-4 and only near-ties closer than that may swap);
- dot product: φ_q = φ_r = x;
- negative squared Euclidean distance: −‖a − b‖² = ⟨[a, 1], [2b, −‖b‖²]⟩ − ‖a‖², and the
  ‖a‖² term is the same for every row, so φ_q = [a, 1], φ_r = [2b, −‖b‖²] rank identically
  (stored in float32: ‖b‖² ≈ D is too coarse in float16).

Rows are scored in chunks (``chunk_rows``) with a running top-k, so the temporary score matrix stays
[queries × chunk] however large the index grows. The index serialises to bytes with safetensors
(no pickle): the row features, the ids and Γ's name — the object the generator loads from the
object store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from riffloop.core import ValidationError

__all__ = [
    "BaselineIndex",
    "CosineSimilarity",
    "DotProductSimilarity",
    "NegativeSquaredDistance",
    "Neighbour",
    "Similarity",
    "register_similarity",
]

FORMAT_VERSION = "1"
DEFAULT_CHUNK_ROWS = 16384


class Similarity(Protocol):
    """Γ(a, b) = ⟨query_features(a), row_features(b)⟩ (up to a per-query constant)."""

    name: ClassVar[str]
    storage_dtype: ClassVar[torch.dtype]

    def row_features(self, rows: Tensor) -> Tensor: ...

    def query_features(self, queries: Tensor) -> Tensor: ...


class CosineSimilarity:
    name: ClassVar[str] = "cosine"
    storage_dtype: ClassVar[torch.dtype] = torch.float16

    @staticmethod
    def _unit(x: Tensor) -> Tensor:
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)

    def row_features(self, rows: Tensor) -> Tensor:
        return self._unit(rows)

    def query_features(self, queries: Tensor) -> Tensor:
        return self._unit(queries)


class DotProductSimilarity:
    name: ClassVar[str] = "dot"
    storage_dtype: ClassVar[torch.dtype] = torch.float32

    def row_features(self, rows: Tensor) -> Tensor:
        return rows

    def query_features(self, queries: Tensor) -> Tensor:
        return queries


class NegativeSquaredDistance:
    name: ClassVar[str] = "neg_sq_euclidean"
    storage_dtype: ClassVar[torch.dtype] = torch.float32

    def row_features(self, rows: Tensor) -> Tensor:
        sq = (rows * rows).sum(dim=1, keepdim=True)
        return torch.cat([2 * rows, -sq], dim=1)

    def query_features(self, queries: Tensor) -> Tensor:
        return torch.cat([queries, torch.ones(queries.shape[0], 1, dtype=queries.dtype)], dim=1)


_SIMILARITIES: dict[str, type] = {
    cls.name: cls for cls in (CosineSimilarity, DotProductSimilarity, NegativeSquaredDistance)
}


def register_similarity(cls: type) -> type:
    """Make a custom Γ loadable by name (usable as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValidationError("a similarity class needs a non-empty ``name``")
    _SIMILARITIES[name] = cls
    return cls


@dataclass(frozen=True)
class Neighbour:
    """One training sample: its id, its row in the index and Γ(z_agg, z)."""

    id: str
    row: int
    score: float


class BaselineIndex:
    """Training latents ``[M, D]`` (or ``[M, *shape]``) with ids; ``nearest`` returns z0."""

    def __init__(
        self,
        latents: Tensor,
        ids: list[str],
        similarity: Similarity | None = None,
        *,
        dtype: torch.dtype | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.similarity: Similarity = similarity or CosineSimilarity()
        self.dtype = dtype or self.similarity.storage_dtype
        if chunk_rows < 1:
            raise ValidationError("chunk_rows must be at least 1")
        self.chunk_rows = chunk_rows
        self.dim = 0
        self._blocks: list[Tensor] = []
        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self.extend(latents, ids)

    # -- building ---------------------------------------------------------------------------

    def extend(self, latents: Tensor, ids: list[str]) -> None:
        """Add training latents (e.g. as songs.encoded events arrive). Ids must be new."""
        if not isinstance(latents, Tensor) or latents.ndim < 2:
            raise ValidationError("latents must be a tensor [M, D] or [M, *shape]")
        flat = latents.detach().reshape(latents.shape[0], latents[0].numel() if len(latents) else 0)
        if len(ids) != flat.shape[0]:
            raise ValidationError(f"got {len(ids)} ids for {flat.shape[0]} latents")
        if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
            raise ValidationError("ids must be unique non-empty strings")
        if self._id_set.intersection(ids):
            raise ValidationError("some ids are already in the index")
        if self._ids and flat.shape[1] != self.dim:
            raise ValidationError(f"latents have {flat.shape[1]} values, the index {self.dim}")
        if flat.shape[0] == 0:
            if not self._ids:
                raise ValidationError("a baseline index needs at least one training latent")
            return
        parts = []
        for start in range(0, flat.shape[0], self.chunk_rows):
            chunk = flat[start : start + self.chunk_rows].to("cpu", torch.float32)
            # One pass: a NaN/inf anywhere makes its row norm non-finite (cheaper than isfinite).
            if not bool(torch.isfinite(torch.linalg.vector_norm(chunk, dim=1)).all()):
                raise ValidationError("latents contain NaN or infinite (or huge) values")
            parts.append(self.similarity.row_features(chunk).to(self.dtype))
        # Rows stay in chunk-sized blocks: extending never copies what is already stored.
        self._blocks.extend(parts)
        self.dim = flat.shape[1]
        self._ids.extend(ids)
        self._id_set.update(ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._blocks)

    # -- search -----------------------------------------------------------------------------

    def nearest(self, z_agg: Tensor, k: int = 1) -> list[Neighbour]:
        """The k training samples with the highest Γ(z_agg, z), best first (z0 = the first)."""
        return self.nearest_batch(z_agg.reshape(1, -1), k)[0]

    def nearest_batch(self, queries: Tensor, k: int = 1) -> list[list[Neighbour]]:
        """``nearest`` for B queries ``[B, D]`` (or ``[B, *shape]``) with one pass over the rows."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        q = queries.detach().reshape(queries.shape[0], -1).to("cpu", torch.float32)
        if q.shape[1] != self.dim:
            raise ValidationError(f"query has {q.shape[1]} values, the index {self.dim}")
        if not bool(torch.isfinite(q).all()):
            raise ValidationError("query contains NaN or infinite values")
        k = min(k, len(self))
        feats = self.similarity.query_features(q).to(self.dtype)
        best_scores = torch.full((q.shape[0], 0), float("-inf"))
        best_rows = torch.zeros((q.shape[0], 0), dtype=torch.long)
        # 1. score one block of rows, 2. merge with the running top-k, 3. next block.
        start = 0
        for block in self._blocks:
            scores = (feats @ block.T).to(torch.float32)
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            cand_scores = torch.cat([best_scores, top.values], dim=1)
            cand_rows = torch.cat([best_rows, top.indices + start], dim=1)
            keep = torch.topk(cand_scores, min(k, cand_scores.shape[1]), dim=1)
            best_scores = keep.values
            best_rows = torch.gather(cand_rows, 1, keep.indices)
            start += block.shape[0]
        return [
            [
                Neighbour(self._ids[int(r)], int(r), float(s))
                for r, s in zip(rows, scores, strict=True)
            ]
            for rows, scores in zip(best_rows, best_scores, strict=True)
        ]

    # -- persistence ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        metadata = {
            "format": FORMAT_VERSION,
            "similarity": self.similarity.name,
            "dim": str(self.dim),
            "ids": json.dumps(self._ids),
        }
        return st_save({"rows": self.rows}, metadata=metadata)

    def row(self, i: int) -> Tensor:
        """The stored features φ_r(z) of row ``i`` (no copy of the other rows)."""
        if not 0 <= i < len(self._ids):
            raise ValidationError(f"row {i} is not in an index of {len(self._ids)}")
        for block in self._blocks:
            if i < block.shape[0]:
                return block[i]
            i -= block.shape[0]
        raise AssertionError("unreachable: the blocks hold every row")

    @property
    def rows(self) -> Tensor:
        """The stored row features φ_r(z) ``[M, D']`` (what ``to_bytes`` writes)."""
        return torch.cat(self._blocks).contiguous()

    @classmethod
    def from_bytes(cls, data: bytes, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> BaselineIndex:
        try:
            tensors = st_load(data)
            # safetensors keeps the metadata in its JSON header: 8-byte length, then the header.
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
            ids = json.loads(meta["ids"])
            name, dim, fmt = meta["similarity"], int(meta["dim"]), meta["format"]
            rows = tensors["rows"]
        except (SafetensorError, KeyError, ValueError, TypeError) as exc:
            raise ValidationError(f"not a baseline index: {exc}") from exc
        if fmt != FORMAT_VERSION:
            raise ValidationError(f"baseline index format {fmt} is not {FORMAT_VERSION}")
        return cls.from_rows(rows, ids, name, dim, chunk_rows=chunk_rows)

    @classmethod
    def from_rows(
        cls,
        rows: Tensor,
        ids: list[str],
        similarity: str,
        dim: int,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> BaselineIndex:
        """An index from stored row features (``rows``), e.g. read back from a file."""
        name = similarity
        if name not in _SIMILARITIES:
            raise ValidationError(f"baseline index uses unknown similarity {name!r}")
        if rows.ndim != 2 or rows.shape[0] != len(ids):
            raise ValidationError("baseline index rows and ids disagree")
        index = cls.__new__(cls)
        index.similarity = _SIMILARITIES[name]()
        index.dtype = rows.dtype
        index.chunk_rows = chunk_rows
        index.dim = dim
        index._blocks = list(torch.split(rows, chunk_rows))
        index._ids = list(ids)
        index._id_set = set(ids)
        return index
