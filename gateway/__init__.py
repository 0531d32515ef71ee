"""The gRPC gateway: uploads, task lifecycle, per-task topics, results. Run with `python -m posemesh.gateway`.

Modules, one concern each: auth (API keys), store (SQLite task store), media (probe and decode
uploads), producer (frames onto raw_frames_<task>), topics (create, hand-off, delete), events (worker
progress and results), metrics (Prometheus), service (the TaskService API), server (wiring, health, reflection).
"""
