"""BaselineIndex: z0 = argmax Γ(z_agg, z) against brute force, chunking, persistence, scale."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch

from riffloop.core import ValidationError
from riffloop.music._baseline import (
    BaselineIndex,
    DotProductSimilarity,
    NegativeSquaredDistance,
    register_similarity,
)

torch.set_num_threads(1)


def _data(m: int = 500, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen), [f"song-{i}" for i in range(m)]


def _exact_cosine(z: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    z64, q64 = z.double(), queries.double()
    return (q64 / q64.norm(dim=1, keepdim=True)) @ (z64 / z64.norm(dim=1, keepdim=True)).T


@pytest.mark.unit
def test_cosine_nearest_matches_brute_force() -> None:
    z, ids = _data()
    index = BaselineIndex(z, ids, chunk_rows=64)
    queries = torch.randn(20, 64, generator=torch.Generator().manual_seed(1))
    exact = _exact_cosine(z, queries)
    for qi, found in enumerate(index.nearest_batch(queries, k=5)):
        top = torch.topk(exact[qi], 5)
        assert [n.row for n in found] == top.indices.tolist() or (
            # float16 rows: only near-ties (< 2e-3) may swap
            float(
                (top.values - torch.tensor([n.score for n in found], dtype=torch.float64))
                .abs()
                .max()
            )
            < 2e-3
        )
        assert found[0].id == ids[found[0].row]
        assert abs(found[0].score - float(top.values[0])) < 2e-3
        assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)


@pytest.mark.unit
def test_a_training_latent_is_its_own_baseline() -> None:
    z, ids = _data(m=300, d=4096)
    index = BaselineIndex(z, ids)
    for i in (0, 17, 299):
        found = index.nearest(z[i] * 3.0)  # cosine ignores the norm
        assert found[0].id == ids[i]
        assert found[0].score == pytest.approx(1.0, abs=1e-3)


@pytest.mark.unit
def test_result_does_not_depend_on_chunking_or_batching() -> None:
    z, ids = _data(m=257)
    queries = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    a = BaselineIndex(z, ids, chunk_rows=7).nearest_batch(queries, k=4)
    b = BaselineIndex(z, ids, chunk_rows=10_000).nearest_batch(queries, k=4)
    c = [BaselineIndex(z, ids).nearest(q, k=4) for q in queries]
    assert [[n.row for n in r] for r in a] == [[n.row for n in r] for r in b]
    assert [[n.row for n in r] for r in a] == [[n.row for n in r] for r in c]


@pytest.mark.unit
def test_k_larger_than_index_returns_everything_in_order() -> None:
    z, ids = _data(m=5)
    found = BaselineIndex(z, ids, chunk_rows=2).nearest(z[0], k=50)
    assert len(found) == 5 and found[0].id == "song-0"
    assert sorted(n.row for n in found) == list(range(5))


@pytest.mark.unit
def test_euclidean_and_dot_are_exact() -> None:
    z, ids = _data(m=400, d=32)
    queries = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    euclid = BaselineIndex(z, ids, NegativeSquaredDistance(), chunk_rows=33)
    dot = BaselineIndex(z, ids, DotProductSimilarity())
    want_e = torch.cdist(queries.double(), z.double()).argmin(dim=1).tolist()
    want_d = (queries.double() @ z.double().T).argmax(dim=1).tolist()
    assert [r[0].row for r in euclid.nearest_batch(queries)] == want_e
    assert [r[0].row for r in dot.nearest_batch(queries)] == want_d


@pytest.mark.unit
def test_custom_similarity_is_pluggable_and_persists() -> None:
    @register_similarity
    class FirstCoordinate:  # Γ(a, b) = a_0 · b_0: a deliberately odd Γ
        name: ClassVar[str] = "first_coordinate_test"
        storage_dtype: ClassVar[torch.dtype] = torch.float32

        def row_features(self, rows: torch.Tensor) -> torch.Tensor:
            return rows[:, :1]

        def query_features(self, queries: torch.Tensor) -> torch.Tensor:
            return queries[:, :1]

    z, ids = _data(m=50, d=8)
    index = BaselineIndex(z, ids, FirstCoordinate())
    q = torch.zeros(8)
    q[0] = 1.0
    assert index.nearest(q)[0].row == int(z[:, 0].argmax())
    loaded = BaselineIndex.from_bytes(index.to_bytes())
    assert loaded.nearest(q)[0].row == int(z[:, 0].argmax())


@pytest.mark.unit
def test_bytes_round_trip_and_extend() -> None:
    z, ids = _data(m=100, d=2 * 8 * 8)
    index = BaselineIndex(z[:60].reshape(60, 2, 8, 8), ids[:60])
    index.extend(z[60:].reshape(40, 2, 8, 8), ids[60:])
    data = index.to_bytes()
    loaded = BaselineIndex.from_bytes(data, chunk_rows=9)
    assert len(loaded) == 100 and loaded.ids == ids and loaded.dtype == torch.float16
    queries = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    assert [[n.id for n in r] for r in loaded.nearest_batch(queries, 3)] == [
        [n.id for n in r] for r in index.nearest_batch(queries, 3)
    ]
    assert index.nbytes == 100 * 128 * 2


@pytest.mark.unit
@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"\xff" * 16, (10**6).to_bytes(8, "little") + b"{}"]
)
def test_bad_bytes_are_validation_errors(data: bytes) -> None:
    with pytest.raises(ValidationError):
        BaselineIndex.from_bytes(data)


@pytest.mark.unit
def test_bad_inputs_are_validation_errors() -> None:
    z, ids = _data(m=4, d=8)
    with pytest.raises(ValidationError):
        BaselineIndex(z, ids[:3])
    with pytest.raises(ValidationError):
        BaselineIndex(z, ["a", "a", "b", "c"])
    with pytest.raises(ValidationError):
        BaselineIndex(torch.empty(0, 8), [])
    with pytest.raises(ValidationError):
        BaselineIndex(torch.full((1, 8), float("nan")), ["x"])
    index = BaselineIndex(z, ids)
    with pytest.raises(ValidationError):
        index.nearest(torch.ones(9))
    with pytest.raises(ValidationError):
        index.nearest(torch.ones(8), k=0)
    with pytest.raises(ValidationError):
        index.extend(z[:1], ids[:1])  # duplicate id


@pytest.mark.slow
def test_scale_100k_by_4096() -> None:
    """Build + query at 100k training latents × 4096 dims (the 64 × 64 model's x_T) on one core.

    Bounds are loose (a shared 2-core machine); bench figures are printed for the report."""
    m, d, chunk = 100_000, 4096, 10_000
    gen = torch.Generator().manual_seed(0)
    index: BaselineIndex | None = None
    build_s = 0.0
    for start in range(0, m, chunk):  # generate and add in chunks: 0.8 GB stored, not 1.6 + 0.8
        part = torch.randn(chunk, d, generator=gen)
        part_ids = [f"s{i}" for i in range(start, start + chunk)]
        t0 = time.perf_counter()
        if index is None:
            index = BaselineIndex(part, part_ids)
        else:
            index.extend(part, part_ids)
        build_s += time.perf_counter() - t0
        if start == 50_000:
            probe = part[123].clone()
    assert index is not None and len(index) == m
    queries = torch.randn(8, d, generator=gen)
    index.nearest(queries[0])  # warm-up
    t0 = time.perf_counter()
    index.nearest(queries[1])
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.nearest_batch(queries, k=5)
    batch_s = time.perf_counter() - t0
    assert index.nearest(probe)[0].id == "s50123"
    print(
        f"\n100k×4096 float16 cosine: build {build_s:.2f} s, "
        f"{index.nbytes / 1e9:.2f} GB, query {single_s * 1e3:.0f} ms, "
        f"batch of 8 {batch_s * 1e3:.0f} ms"
    )
    assert single_s < 3.0
    assert batch_s < 6.0
