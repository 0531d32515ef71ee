"""The gRPC gateway: uploads, live tasks, task lifecycle, per-task topics, results. Run with
`python -m posemesh.gateway`.

Modules, one concern each: auth (API keys), interceptors (what every API call passes through: statuses,
authentication, stream limits), validation (request fields), limits (per-user limits), blocking (blocking
work kept off the event loop), store (SQLite task store), lifecycle (a task started, run again, ended,
cleaned up), producer (an upload's frames onto raw_frames_<task>), live (a camera's frames onto it), sources
(the camera allow-list), live_view (WatchFrames fan-out), topics (create, hand-off, delete), reservations
(task ids whose topics are made ahead), events (worker progress and results), changes (task changes as an
asyncio feed), broker_watch (is the broker there, with the same data), metrics (Prometheus), service (the
TaskService API), server (wiring, health, reflection, the sweep).
"""
