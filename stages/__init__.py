"""Stage workers: detect -> pose -> track -> annotate (declared in mesh/pipeline.py).

A stage is one class (detect.py, pose.py, track.py, annotate.py) on the Stage base of base.py. The worker
(worker.py: the loop) runs one stage and composes one concern per module: flows.py (what differs between
ordered and unordered stages: pool, end of stream, failure isolation, commit rule, recovery), control.py
(which tasks exist), reading.py (consumer group, assignment, flow control, commits), offsets.py (which
offsets may be committed), pools.py (ordering and de-duplication), pixels.py (frames by reference),
shared_pictures.py (JPEGs from detect and decoded frames from pose handed to later stages on one host),
reporting.py (progress, results, failures, heartbeats), control_api.py (StageService and health). triton.py
calls models with deadlines; results.py, live_out.py and annotate's other helpers make its files and
streams. Run one with `python -m posemesh.stages <name>`; start more of the same name to scale out.
"""
