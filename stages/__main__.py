"""python -m posemesh.stages NAME [--control-port P] [--metrics-port P]: run one stage worker, or the ingest
worker that decodes uploads for them (stages/ingest.py).

The stages and their classes are declared in mesh/pipeline.py."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys

from posemesh.mesh import pauses, tracing
from posemesh.mesh.pipeline import INGEST, SPECS, WORKER_NAMES
from posemesh.mesh.settings import Settings


def load(name: str):
    module, cls = SPECS[name].entry.split(":")
    return getattr(importlib.import_module(module), cls)()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posemesh.stages", description="Run one posemesh stage worker.")
    parser.add_argument("stage", choices=WORKER_NAMES)
    parser.add_argument("--control-port", type=int, default=0, help="StageService + health (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics (0: off)")
    return parser


def make_worker(name: str, control_port: int, metrics_port: int):
    if name == INGEST:  # a source for the stages, not a stage of the frames' pipeline
        from posemesh.stages.ingest import IngestWorker

        return IngestWorker(Settings(), control_port, metrics_port)
    from posemesh.stages.worker import StageWorker

    return StageWorker(load(name), Settings(), control_port, metrics_port)


def serve(name: str, control_port: int, metrics_port: int) -> None:
    """Run a worker until SIGTERM/SIGINT. SIGUSR1 writes every thread's stack to the log (a worker that
    seems stuck says where), and so does a fatal signal on a Python thread before the process dies. A crash
    in a librdkafka thread prints nothing (those threads block signals): exit status -11, read the core."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    faulthandler.enable(all_threads=True)
    tracing.setup(f"posemesh-{name}")
    worker = make_worker(name, control_port, metrics_port)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    try:
        worker.run()
    finally:
        tracing.shutdown()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.stage} %(levelname)s %(message)s")
    pauses.start()
    serve(args.stage, args.control_port, args.metrics_port)
    # The worker has left its group, flushed its outputs and said goodbye: exit without the interpreter's
    # teardown, whose garbage collection destroys the Kafka clients, and a destroy can wait on librdkafka's
    # threads (trying librdkafka 2.4.0: at every worker stop after a few tasks, until the SIGKILL).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
