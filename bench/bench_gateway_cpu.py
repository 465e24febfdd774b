"""Gateway CPU per ``SubmitFeedback`` call, in process: no broker, no network, no other load.

``python -m bench.bench_gateway_cpu [--calls 400] [--batch 100]`` starts the gateway on the
in-memory ports (the test adapters), makes every rated track ready, then times ``--calls``
sequential calls of ``--batch`` ratings each (the first 5 % untimed). Run it in two checkouts,
interleaved, to compare builds: what the broker-level benchmark (bench_ratings) cannot
separate from scheduling noise on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

from riffloop.core import new_envelope
from riffloop.runtime import TokenSigner
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import (
    SECRET,
    generated_track_ready,
    shared_ports,
    start_service,
    wait_for,
)


def _ready(track_id: str, user: str) -> events_pb2.Envelope:
    audio = common_pb2.ObjectRef(
        bucket="tracks", key=f"{track_id}.wav", size_bytes=10, sha256="a" * 64
    )
    return new_envelope("generator", generated_track_ready(track_id, user, audio=audio))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--users", type=int, default=20)
    args = parser.parse_args()
    if args.calls < 20 or not 1 <= args.batch <= 100 or args.users < 1:
        parser.error("need --calls ≥ 20, 1 ≤ --batch ≤ 100, --users ≥ 1")
    ports = shared_ports()
    gateway = start_service("gateway", ports, rate_limit_per_s=1e6, rate_limit_burst=100_000)
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    users = [f"u{i}" for i in range(args.users)]
    signer = TokenSigner(SECRET)
    auth = {u: (("authorization", f"Bearer {signer.issue(u)}"),) for u in users}
    per_user = -(-args.calls // args.users) * args.batch
    for user in users:
        for k in range(per_user):
            ports.bus.publish("tracks.ready.v1", f"{user}-t{k}", _ready(f"{user}-t{k}", user))
    last = f"gw:track:{users[-1]}-t{per_user - 1}"
    wait_for(lambda: ports.kv.get(last) is not None, 600, "every track ready at the gateway")
    seconds = []
    for call in range(args.calls):
        user, first = users[call % args.users], (call // args.users) * args.batch
        items = [
            pb.FeedbackItem(rating=pb.RateRequest(track_id=f"{user}-t{first + i}", stars=4))
            for i in range(args.batch)
        ]
        started = time.perf_counter()
        stub.SubmitFeedback(pb.SubmitFeedbackRequest(items=items), metadata=auth[user], timeout=10)
        seconds.append(time.perf_counter() - started)
    timed = seconds[args.calls // 20 :]
    print(
        f"SubmitFeedback × {args.batch} ratings, {len(timed)} calls: mean "
        f"{statistics.mean(timed) * 1e3:.2f} ms, p50 {statistics.median(timed) * 1e3:.2f} ms "
        f"({statistics.mean(timed) / args.batch * 1e6:.0f} µs per rating)"
    )
    gateway.channel.close()
    gateway.runtime.stop()


if __name__ == "__main__":
    main()
