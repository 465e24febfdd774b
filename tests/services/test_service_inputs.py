"""Malformed calls to the five internal services get the right code and a reason."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from riffloop.v1 import encoder_service_pb2 as enc
from riffloop.v1 import encoder_service_pb2_grpc as enc_grpc
from riffloop.v1 import feedback_service_pb2 as fb
from riffloop.v1 import feedback_service_pb2_grpc as fb_grpc
from riffloop.v1 import generator_service_pb2 as gen
from riffloop.v1 import generator_service_pb2_grpc as gen_grpc
from riffloop.v1 import selector_service_pb2 as sel
from riffloop.v1 import selector_service_pb2_grpc as sel_grpc
from riffloop.v1 import trainer_service_pb2 as tr
from riffloop.v1 import trainer_service_pb2_grpc as tr_grpc
from tests.services.conftest import Running, wait_for

pytestmark = [pytest.mark.contract, pytest.mark.slow]

C = grpc.StatusCode


def expect(code: grpc.StatusCode, call: Callable[[], object], reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, info.value.details()
    assert reason in (info.value.details() or ""), info.value.details()


def test_internal_services_refuse_bad_input(all_services: dict[str, Running]) -> None:
    wait_for(lambda: all(r.runtime.readiness.ready for r in all_services.values()), 60, "ready")
    feedback = fb_grpc.FeedbackServiceStub(all_services["feedback"].channel)
    expect(C.INVALID_ARGUMENT, lambda: feedback.TrackScore(fb.TrackScoreRequest()), "required")
    expect(C.NOT_FOUND, lambda: feedback.TrackScore(fb.TrackScoreRequest(track_id="x")), "unknown")
    expect(
        C.NOT_FOUND,
        lambda: feedback.RaterReport(fb.RaterReportRequest(user_id="x")),
        "no accepted ratings",
    )
    selector = sel_grpc.SelectorServiceStub(all_services["selector"].channel)
    expect(
        C.INVALID_ARGUMENT,
        lambda: selector.Population(sel.PopulationRequest(page_size=5000)),
        "page_size",
    )
    assert not selector.CurrentTrainset(sel.CurrentTrainsetRequest()).HasField("trainset")
    encoder = enc_grpc.EncoderServiceStub(all_services["encoder"].channel)
    expect(C.INVALID_ARGUMENT, lambda: encoder.Encode(enc.EncodeRequest(song_id="zz")), "sha256")
    expect(
        C.NOT_FOUND,
        lambda: encoder.Encode(enc.EncodeRequest(song_id="0" * 64)),
        "not in the object store",
    )
    generator = gen_grpc.GeneratorServiceStub(all_services["generator"].channel)
    expect(
        C.INVALID_ARGUMENT,
        lambda: generator.Generate(gen.GeneratorServiceGenerateRequest()),
        "1 to 3",
    )
    expect(
        C.INVALID_ARGUMENT,
        lambda: generator.Generate(
            gen.GeneratorServiceGenerateRequest(song_ids=["0" * 64], similarity=1.0)
        ),
        "similarity",
    )
    expect(
        C.NOT_FOUND,
        lambda: generator.Generate(
            gen.GeneratorServiceGenerateRequest(song_ids=["0" * 64], similarity=0.5), timeout=30
        ),
        "never uploaded",
    )
    assert generator.CurrentModel(gen.CurrentModelRequest()).version == "v0001"
    trainer = tr_grpc.TrainerServiceStub(all_services["trainer"].channel)
    expect(C.INVALID_ARGUMENT, lambda: trainer.Promote(tr.PromoteRequest()), "required")
    expect(
        C.NOT_FOUND, lambda: trainer.Promote(tr.PromoteRequest(version="v9999")), "not registered"
    )
    expect(C.FAILED_PRECONDITION, lambda: trainer.Rollback(tr.RollbackRequest()), "base model")
    status = trainer.TrainStatus(tr.TrainStatusRequest())
    assert status.current_version == "v0001" and status.state == tr.TRAINER_STATE_IDLE


def test_the_encoder_keeps_evenly_spaced_windows_of_a_long_song(
    all_services: dict[str, Running],
) -> None:
    """A song of many windows: the encoder keeps max_slices (4) of them, evenly spaced, and
    turns only those into images; each is the image the whole song's window would have been."""
    import hashlib

    import torch

    from riffloop.music import MelCodec, MelConfig, decode_audio, to_uint8
    from riffloop.runtime import LATENTS_BUCKET, LatentRecord
    from tests.services.conftest import wav_bytes

    wait_for(lambda: all(r.runtime.readiness.ready for r in all_services.values()), 60, "ready")
    running = all_services["encoder"]
    song = wav_bytes(seconds=20.0, freq=330.0)
    song_id = hashlib.sha256(song).hexdigest()
    objects = running.state.ports.objects
    objects.put("songs", song_id, song)
    encoder = enc_grpc.EncoderServiceStub(running.channel)
    encoder.Encode(enc.EncodeRequest(song_id=song_id), timeout=120)
    record = LatentRecord.from_bytes(objects.get(LATENTS_BUCKET, LatentRecord.key(song_id)))
    codec = MelCodec(MelConfig.from_dict(record.mel))
    whole = codec.audio_to_images(torch.from_numpy(decode_audio(song).samples))
    n = whole.shape[0]
    assert n > 4
    picks = torch.linspace(0, n - 1, 4).round().long().unique()
    assert torch.equal(record.images, to_uint8(whole[picks]))
