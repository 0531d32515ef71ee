"""Stage workers: detect -> pose -> track -> annotate (declared in mesh/pipeline.py).

A stage is one class (detect.py, pose.py, track.py, annotate.py) on the Stage base of base.py. The
worker (worker.py) runs one stage and composes one concern per module: control.py (which tasks exist),
reading.py (consumer group, assignment, flow control, commits), pools.py (ordering and de-duplication),
reporting.py (progress, results, failures, heartbeats), control_api.py (StageService and health),
triton.py (model calls with deadlines). results.py writes annotate's files.
Run one with `python -m posemesh.stages <name>`; start more of the same name to scale out.
"""
