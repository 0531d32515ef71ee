"""python -m posemesh.stages NAME [--control-port P] [--metrics-port P]: run one stage worker, or the ingest
worker that decodes uploads for them (stages/ingest.py).

The stages and their classes are declared in mesh/pipeline.py."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from posemesh.mesh.pipeline import INGEST, SPECS, WORKER_NAMES
from posemesh.mesh.settings import Settings
from posemesh.stages.worker import serve


def load(name: str):
    module, cls = SPECS[name].entry.split(":")
    return getattr(importlib.import_module(module), cls)()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posemesh.stages", description="Run one posemesh stage worker.")
    parser.add_argument("stage", choices=WORKER_NAMES)
    parser.add_argument("--control-port", type=int, default=0, help="StageService + health (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics (0: off)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.stage} %(levelname)s %(message)s")
    if args.stage == INGEST:  # a source, not a stage of the frames' pipeline
        from posemesh.stages.ingest import serve as serve_ingest

        serve_ingest(Settings(), args.control_port, args.metrics_port)
    else:
        serve(load(args.stage), Settings(), args.control_port, args.metrics_port)
    # The worker has left its group, flushed its outputs and said goodbye: exit without the interpreter's
    # teardown, whose garbage collection destroys the Kafka clients, and a destroy can wait on librdkafka's
    # threads (trying librdkafka 2.4.0: at every worker stop after a few tasks, until the SIGKILL).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
