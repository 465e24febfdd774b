"""The listen-and-rate page (web/, served by the gateway over Connect) in headless Chromium.

Debian's chromium, driven by Playwright (never a downloaded browser), against the six services
in this process on shared in-memory ports (tiny untrained model, as tests/services). A listener
signs in (dev sign-in), uploads a real recording (a Bach chorale rendered by fluidsynth, as the
corpus is), sees a refused upload's reason, generates a track, plays it to the end, rates it,
takes a track from the queue, plays and rates it, and finds the ratings counted in the model
history. The page's calls pass the same token and rate-limit checks as gRPC (an expired token, a
user over the limit), and axe-core finds no serious or critical violation on any page. The page
is used at 360 px width. With RIFFLOOP_WEB_SCREENSHOTS=<dir> one screenshot per page lands there
(docs/web holds the committed ones).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import soundfile

from riffloop.client import GatewayClient
from riffloop.runtime import TokenSigner
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import (
    LOOP_OVERRIDES,
    SECRET,
    Running,
    shared_ports,
    start_service,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WEB_DIST = REPO / "web" / "dist"
AXE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WIDTH, HEIGHT = 360, 800


def _recording(tmp: Path, seconds: float = 8.0) -> bytes:
    """A real recording: a chorale rendered by fluidsynth with a GM soundfont, as FLAC."""
    from riffloop.music._corpus import _render_piece

    out = tmp / "bwv13.6-piano.flac"
    result = _render_piece("bach/bwv13.6.mxl", ("piano",), (str(out),), 22050)["piano"]
    assert result["ok"], result
    audio, rate = soundfile.read(out, dtype="float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, audio[: int(seconds * rate)], rate, format="FLAC")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Running]]:
    if not (WEB_DIST / "app.js").is_file() or not AXE.is_file():
        pytest.fail("the page is not built: run `npm ci && npm run build` in web/", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail("Debian's chromium is missing: apt-get install chromium", pytrace=False)
    import torch

    torch.set_num_threads(1)
    ports = shared_ports()
    started: dict[str, Running] = {}
    overrides = {
        **LOOP_OVERRIDES,
        "gateway": {
            **LOOP_OVERRIDES["gateway"],
            "connect_port": 0,
            "dev_sign_in": True,
            # a bucket small enough to empty in a test (a page's flow makes ~40 calls)
            "rate_limit_burst": 150,
            "rate_limit_per_s": 1.0,
        },
    }
    try:
        for name in ("trainer", "gateway", "encoder", "generator", "feedback", "selector"):
            started[name] = start_service(name, ports, **overrides.get(name, {}))
        yield started
    finally:
        for running in started.values():
            running.channel.close()
            running.runtime.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # no sound card here: play into a fake sink, in real time
            args=["--autoplay-policy=no-user-gesture-required", "--disable-audio-output"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def base_url(stack: dict[str, Running]) -> str:
    return f"http://127.0.0.1:{cast(Any, stack['gateway'].runtime.worker('connect')).port}"


def new_page(browser: Any, stack: dict[str, Running], *, bypass_csp: bool = True) -> Any:
    # bypass_csp lets the test inject axe-core; the page itself never needs it (test_csp_holds).
    context = browser.new_context(
        viewport={"width": WIDTH, "height": HEIGHT}, base_url=base_url(stack), bypass_csp=bypass_csp
    )
    context.set_default_timeout(30_000)
    return context.new_page()


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations of the page as shown now."""
    page.add_script_tag(path=str(AXE))
    found = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
            .filter(v => v.impact === 'serious' || v.impact === 'critical')
            .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target)}))"""
    )
    return cast(list[dict[str, Any]], found)


def shoot(page: Any, name: str, tmp: Path) -> None:
    page.screenshot(path=str(tmp / f"{name}.png"), full_page=True)
    target = os.environ.get("RIFFLOOP_WEB_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / f"{name}.png", Path(target) / f"{name}.png")


def sign_in(page: Any, name: str) -> None:
    page.goto("/")
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/#create")


# Plays 1 s, pauses 1 s, jumps to 2 s before the end and plays on: 3 s heard.
PAUSE_AND_SEEK = """async audio => {
    const wait = ms => new Promise(done => setTimeout(done, ms));
    await audio.play(); await wait(1000); audio.pause(); await wait(1000);
    audio.currentTime = audio.duration - 2; await audio.play();
}"""


def play_to_the_end_and_rate(page: Any, host: str, stars: int, *, skip: bool = False) -> None:
    player = page.locator(f"{host} .player[data-ready=true]")
    player.wait_for(timeout=60_000)
    assert player.locator("img.mel").evaluate("img => img.complete && img.naturalWidth > 0")
    player.locator("audio").evaluate(PAUSE_AND_SEEK if skip else "audio => audio.play()")
    player.get_by_text("Played to the end").wait_for(timeout=60_000)
    if not skip:
        heard = player.locator("audio").evaluate(
            "a => { let t = 0; for (let i = 0; i < a.played.length; i++)"
            " t += a.played.end(i) - a.played.start(i); return [t, a.duration]; }"
        )
        assert heard[0] == pytest.approx(heard[1], abs=0.3)
    page.wait_for_timeout(700)  # no person rates within half a second (the spam filter's floor)
    player.get_by_label(f"{stars} stars").check()
    player.get_by_role("button", name="Send rating").click()
    player.get_by_text(f"Rated {stars} stars").wait_for()


def test_sign_in_upload_generate_listen_rate_and_see_it_counted(
    stack: dict[str, Running], browser: Any, tmp_path: Path
) -> None:
    recording = _recording(tmp_path)
    page = new_page(browser, stack)
    # 1. Signed out, the page shows the sign-in page; dev sign-in gives a token for a name.
    page.goto("/")
    page.get_by_label("Your name").wait_for()
    assert axe_violations(page) == []
    shoot(page, "signin", tmp_path)
    sign_in(page, "wendy")

    # 2. A refused upload shows the API's own reason (the one gRPC gives for the same bytes).
    junk = b"these bytes are not audio " * 100
    stub = pb_grpc.GatewayServiceStub(stack["gateway"].channel)
    token = TokenSigner(SECRET).issue("probe")
    with pytest.raises(grpc.RpcError) as refused:
        stub.UploadSong(
            iter(
                [
                    pb.UploadSongRequest(metadata=pb.UploadSongMetadata(content_type="audio/wav")),
                    pb.UploadSongRequest(chunk=junk),
                ]
            ),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    page.locator("#files").set_input_files(
        {"name": "notes.wav", "mimeType": "audio/wav", "buffer": junk}
    )
    page.locator(".uploads .refused").wait_for()
    assert page.locator(".uploads .refused").inner_text() == f"Refused: {refused.value.details()}"
    assert page.get_by_role("button", name="Generate").is_disabled()

    # 3. A real recording uploads with progress; sliders by keyboard; generate until ready.
    page.locator("#files").set_input_files(
        {"name": "chorale.flac", "mimeType": "audio/flac", "buffer": recording}
    )
    page.locator(".uploads .accepted").get_by_text("Uploaded.").wait_for()
    assert page.locator(".uploads progress").last.evaluate("p => p.value") == 1
    page.get_by_label("Quality").focus()
    page.keyboard.press("Home")  # the fewest denoising steps: the tiny model is fast anyway
    assert page.locator("#quality-value").inner_text() == "5"
    page.get_by_label("Similarity").focus()
    page.keyboard.press("ArrowRight")
    assert page.locator("#similarity-value").inner_text() == "0.55"
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Your track is ready.").wait_for(timeout=180_000)
    play_to_the_end_and_rate(page, "#create-player", 4)
    assert axe_violations(page) == []
    shoot(page, "create", tmp_path)

    # 4. The queue: a track made for someone else's request, played and rated.
    target = f"127.0.0.1:{stack['gateway'].port}"
    with GatewayClient(target, TokenSigner(SECRET).issue("olga"), timeout_s=30) as olga:
        song = olga.upload_song(recording).song_id
        other = olga.generate([song], similarity=0.4, quality=5)
        olga.wait_ready(other, timeout_s=180)
    page.goto("/#listen")
    page.get_by_role("button", name="Next track").click()
    play_to_the_end_and_rate(page, "#listen-player", 5, skip=True)

    # Honest listening time: the pause adds nothing, the jump skips what it jumped over.
    def listens(events: list[Any]) -> list[Any]:
        return [e for e in events if e.track_id == other and e.HasField("listen")]

    (listen,) = listens(_feedback(stack, until=lambda events: bool(listens(events))))
    assert listen.user_id == "wendy" and listen.listen.completed
    assert 2.5 <= listen.listen.seconds_listened <= 3.6 < listen.listen.clip_seconds - 1
    assert axe_violations(page) == []
    shoot(page, "listen", tmp_path)

    # 5. The model history counts both ratings (generated or baseline: the page never knows).
    kv = stack["gateway"].state.kv
    wait_for(lambda: _rated(kv) >= 2, timeout_s=60, what="the feedback service's scoring pass")
    page.goto("/#history")
    page.locator("#history-table tbody tr").first.wait_for()
    counts = page.locator("#history-table tbody tr").evaluate_all(
        "rows => rows.map(r => [r.cells[3].textContent, r.cells[5].textContent])"
    )
    assert sum(int(g) + int(b) for g, b in counts) == 2
    assert page.locator("#chart svg circle, #chart svg rect").count() >= 1

    # 6. More listeners (through gRPC, in real time): from two ratings a kind shows its interval.
    threads = [
        threading.Thread(target=_listener, args=(target, f"listener-{i}", 2 + i % 4))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    wait_for(lambda: _rated(kv) >= 10, timeout_s=60, what="the listeners' ratings scored")
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#history-table tbody tr')].reduce("
        "(n, r) => n + Number(r.cells[3].textContent) + Number(r.cells[5].textContent), 0) >= 10"
    )
    assert page.locator("#chart svg line[stroke-width='2']").count() >= 3  # an interval drawn
    assert axe_violations(page) == []
    shoot(page, "history", tmp_path)


def _listener(target: str, user: str, stars: int) -> None:
    """A listener who hears every track the queue gives them to the end, then rates it."""
    with GatewayClient(target, TokenSigner(SECRET).issue(user), timeout_s=30) as client:
        while (track := client.next_track()) is not None:
            client.audio(track.track_id)
            time.sleep(track.duration_seconds)
            client.report_listen(track.track_id, track.duration_seconds, completed=True)
            time.sleep(0.6)
            client.rate(track.track_id, stars)


def _feedback(
    stack: dict[str, Running], until: Callable[[list[Any]], bool], timeout_s: float = 30.0
) -> list[Any]:
    """Every FeedbackReceived the gateway published, read until `until` holds (a fresh group).

    One poll is not enough: Kafka answers a poll with whatever one partition's fetch returned
    first, so the event we look for may still be in another partition's next fetch.
    """
    from riffloop.core import decode_envelope

    bus = stack["gateway"].state.bus
    subscription = bus.subscribe(f"web-test-{time.monotonic_ns()}", ["feedback.received.v1"])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(out) and time.monotonic() < deadline:
            for message in subscription.poll(1.0, max_records=10_000):
                envelope = decode_envelope(message.value, message.topic)
                kind = envelope.WhichOneof("payload")
                if kind == "feedback_received":
                    out.append(envelope.feedback_received)
                elif kind == "feedback_batch":
                    out.extend(envelope.feedback_batch.items)
    finally:
        subscription.close()
    return out


def _rated(kv: Any) -> int:
    import json

    from riffloop.runtime import MODEL_RATINGS_KEY

    total = 0
    for raw in kv.hgetall(MODEL_RATINGS_KEY).values():
        body = json.loads(raw)
        total += sum(int(body.get(kind, {}).get("rating_count", 0)) for kind in body)
    return total


def test_the_pages_calls_pass_the_same_auth_and_rate_limit_as_grpc(
    stack: dict[str, Running], browser: Any
) -> None:
    page = new_page(browser, stack)
    page.goto("/")
    expired = TokenSigner(SECRET, clock=lambda: 1_000.0).issue("late", ttl_s=60)
    page.evaluate("t => sessionStorage.setItem('riffloop.token', t)", expired)
    page.goto("/#history")
    page.get_by_text("Refused: bearer token expired. Sign in again.").wait_for()

    # A user whose bucket gRPC calls emptied is refused on the page too: one limiter.
    token = TokenSigner(SECRET).issue("greedy")
    stub = pb_grpc.GatewayServiceStub(stack["gateway"].channel)
    with pytest.raises(grpc.RpcError) as limited:
        for _ in range(500):
            stub.ListModels(
                pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
    assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    page.evaluate("t => sessionStorage.setItem('riffloop.token', t)", token)
    page.goto("/#listen")
    page.get_by_role("button", name="Next track").click()
    status = page.locator("#listen-status")
    status.get_by_text("Refused: rate limit exceeded for user greedy").wait_for()


def test_csp_holds_and_the_page_works_without_inline_code(
    stack: dict[str, Running], browser: Any
) -> None:
    page = new_page(browser, stack, bypass_csp=False)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    sign_in(page, "carla")
    page.goto("/#history")
    page.locator("#history-status").get_by_text("model version").wait_for()
    assert errors == []
