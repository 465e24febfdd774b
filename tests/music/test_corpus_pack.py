"""The packed (8-bit, xz) corpus copy that travels to a GPU machine reads back like the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from riffloop.music import MelConfig, load_corpus, pack_corpus

pytestmark = pytest.mark.unit


def _fake_corpus(folder: Path, n: int = 6) -> torch.Tensor:
    mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    images = (torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).half()
    images[0] = -1.0  # silence floor and full scale must survive exactly
    images[1] = 1.0
    folder.mkdir(parents=True)
    payload = {
        "images": images,
        "pieces": torch.arange(n),
        "instruments": torch.zeros(n, dtype=torch.int64),
        "windows": torch.arange(n),
    }
    torch.save(payload, folder / "train.pt")
    manifest = {
        "version": "test",
        "fingerprint": "f",
        "mel": mel.to_dict(),
        "piece_ids": [f"p{i}" for i in range(n)],
        "instrument_names": ["piano"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return images.float()


def test_a_packed_corpus_reads_back_within_half_a_quantisation_step(tmp_path: Path) -> None:
    original = _fake_corpus(tmp_path / "mel")
    packed = pack_corpus(tmp_path / "mel", tmp_path / "packed")
    assert not (packed / "train.pt").exists()
    assert json.loads((packed / "manifest.json").read_text())["encoding"] == "uint8-xz"
    split = load_corpus(packed, "train")
    assert split.images.dtype == torch.float32
    assert float((split.images - original).abs().max()) <= 1 / 255 + 1e-6
    assert torch.equal(split.images[0], original[0]) and torch.equal(split.images[1], original[1])
    assert torch.equal(split.pieces, torch.arange(6))
    assert split.mel == load_corpus(tmp_path / "mel", "train").mel


def test_packing_a_missing_corpus_says_what_to_run(tmp_path: Path) -> None:
    from riffloop.core import NotFoundError

    with pytest.raises(NotFoundError, match=r"riffloop\.music corpus"):
        pack_corpus(tmp_path / "absent", tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
