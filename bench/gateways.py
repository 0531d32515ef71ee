"""The front door scaled out: N concurrent uploads through 1 gateway (SQLite, then PostgreSQL), through 2
gateways sharing a PostgreSQL store (`posemesh up --gateways 2`), and with the uploads decoded by 1 or 2
ingest replicas instead of the gateways (`--workers ingest=N`), on the same machine in one run (issue 18,
items 1 and 5). The PostgreSQL run with one gateway tells what the store costs from what a second gateway
costs.

    .venv/bin/python bench/gateways.py [--uploads 8] [--frames 60] [--ingest-only]

Each configuration starts its own local stack (one worker per stage) and sends the same uploads through the
SDK (given every gateway address, so calls are spread round-robin). Printed per configuration: aggregate
frames/s from the first upload's start to the last one's end, the median and worst time from an upload's
end to its first annotated frame, and CPU milliseconds per frame by process kind (gateway = the API, and
decode + JPEG encode unless ingest replicas do that; ingest = decode + JPEG encode), so the ceiling of one
gateway and of one ingest replica can be read off: frames/s per core = 1000 / (ms per frame). Then the
ratios 2 gateways / 1 gateway, 2 ingest replicas / 1, and the gateway's CPU per frame with / without ingest.

On two cores the models bound throughput, not the front door, so the ratio of throughputs says little there;
the CPU per frame is what carries over to a cluster. --ingest-only runs the three single-gateway SQLite
configurations (no ingest, 1 and 2 replicas).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.end_to_end import cpu_by_service
from bench.measure import run_uploads
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.pipeline import INGEST, STAGE_NAMES
from posemesh.mesh.settings import default_media_dir
from tests.helpers import make_clip


def run(gateways: int, postgres: bool, ingest: int, clip: Path, uploads: int, work: Path) -> dict:
    workers = {s: 1 for s in STAGE_NAMES} | ({INGEST: ingest} if ingest else {})
    stack = Stack(StackConfig(run_dir=work / f"stack-{gateways}-{postgres}-{ingest}", rtsp_port=-1,
                              gateways=gateways, postgres=postgres, workers=workers)).start()
    try:
        with Client(stack.gateway_address) as client:
            run_uploads(client, clip, 1, "default")  # warm: models loaded, reservations made
            before = cpu_by_service(stack)
            done, wall = run_uploads(client, clip, uploads, "default")
            after = cpu_by_service(stack)
    finally:
        stack.stop()
    frames = sum(u.frames for u in done)
    firsts = sorted(u.first_latency for u in done)
    return {"fps": frames / wall, "first_median": statistics.median(firsts), "first_worst": firsts[-1],
            "cpu_ms": {k: 1000 * (after[k] - before.get(k, 0.0)) / frames for k in after}, "frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--ingest-only", action="store_true", help="only the single-gateway SQLite runs")
    args = parser.parse_args()
    configs = [(1, False, 0), (1, False, 1), (1, False, 2)]
    if not args.ingest_only:
        configs += [(1, True, 0), (2, True, 0), (2, True, 2)]
    with tempfile.TemporaryDirectory(prefix="posemesh-bench-gateways-") as tmp:
        work = Path(tmp)
        clip = make_clip(default_media_dir() / "towncentre_1080p_302f.mp4", work / "clip.mp4", args.frames)
        results = {c: run(*c, clip, args.uploads, work) for c in configs}
    kinds = sorted({k for r in results.values() for k in r["cpu_ms"]})
    print(f"{args.uploads} concurrent uploads of {args.frames} frames of 1080p (towncentre)")
    print(f"{'gateways':>8} {'store':>10} {'ingest':>6} {'frames/s':>9} {'first p50 s':>12} {'first max s':>12}  "
          "CPU ms per frame: " + " ".join(f"{k:>9}" for k in kinds))
    for (n, pg, ingest), r in results.items():
        store = "postgresql" if pg else "sqlite"
        print(f"{n:>8} {store:>10} {ingest:>6} {r['fps']:>9.2f} {r['first_median']:>12.2f} {r['first_worst']:>12.2f}  "
              f"{'':17}" + " ".join(f"{r['cpu_ms'].get(k, 0.0):>9.1f}" for k in kinds))
    alone, one, two = results[(1, False, 0)], results[(1, False, 1)], results[(1, False, 2)]
    print(f"ratios 2/1 ingest replicas: frames/s {two['fps'] / one['fps']:.2f}, first-frame p50 "
          f"{two['first_median'] / one['first_median']:.2f}")
    with_ingest, without = one["cpu_ms"]["gateway"], alone["cpu_ms"]["gateway"]
    print(f"gateway CPU per frame with / without ingest replicas: {with_ingest / without:.2f} "
          f"({with_ingest:.1f} / {without:.1f} ms)")
    print(f"one gateway core serves about {1000 / one['cpu_ms']['gateway']:.0f} 1080p frames/s without decoding, "
          f"{1000 / alone['cpu_ms']['gateway']:.0f} decoding them; one ingest core decodes about "
          f"{1000 / one['cpu_ms'][INGEST]:.0f}")
    if (2, True, 0) in results:
        a, b = results[(1, True, 0)], results[(2, True, 0)]
        print(f"ratios 2/1 gateways on PostgreSQL: frames/s {b['fps'] / a['fps']:.2f}, first-frame p50 "
              f"{b['first_median'] / a['first_median']:.2f}, gateway CPU per frame "
              f"{b['cpu_ms']['gateway'] / a['cpu_ms']['gateway']:.2f}")


if __name__ == "__main__":
    main()
