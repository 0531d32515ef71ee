"""Stage workers: detect -> pose -> track -> annotate.

Each stage is one class (stages/detect.py, pose.py, track.py, annotate.py) on the common runtime in
stages/runtime.py, which owns Kafka I/O, batching, offsets, de-duplication, control and metrics.
Run one with `python -m posemesh.stages <name>`; start more of the same name to scale out.
"""
