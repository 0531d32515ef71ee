"""Every knob of posemesh in one place, read from the environment (POSEMESH_*). No other module reads a
POSEMESH_* variable (tests/test_deploy.py checks that, and the deploy manifests against the names read
here). Not here: the client's POSEMESH_ADDRESS and POSEMESH_API_KEY (posemesh.client, which installs
without the server), and POSEMESH_ONNX_DIR / POSEMESH_ORT_THREADS, which the local stack gives the Triton
models (model_repository/, run by Triton's own Python).

Defaults suit the local stack on one machine; production overrides them (deploy/ shows how).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _checkout_root() -> Path | None:
    """The source checkout this code runs from (`make venv` installs it editable), or None when posemesh
    is installed from a wheel: then nothing may default to a folder inside site-packages."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "mesh").is_dir() else None


# Where a checkout keeps what it runs and produces (run/ is git-ignored); installed: the working directory.
CHECKOUT = _checkout_root()
REPO_ROOT = CHECKOUT or Path.cwd()
RUN_DIR = REPO_ROOT / "run"
JPEG_QUALITY = 80  # the frames' JPEG quality on raw_frames unless POSEMESH_JPEG_QUALITY says otherwise


def env(name: str, default: str) -> str:
    """POSEMESH_<name>, else the default."""
    return os.environ.get(f"POSEMESH_{name}", default)



def default_models_dir() -> Path:
    """POSEMESH_MODELS_DIR, else ../shared/models beside the checkout when it exists, else ./models."""
    if "POSEMESH_MODELS_DIR" in os.environ:
        return Path(os.environ["POSEMESH_MODELS_DIR"])
    shared = REPO_ROOT.parent / "shared" / "models"
    return shared if shared.is_dir() else REPO_ROOT / "models"


def default_media_dir() -> Path:
    if "POSEMESH_MEDIA_DIR" in os.environ:
        return Path(os.environ["POSEMESH_MEDIA_DIR"])
    return REPO_ROOT.parent / "shared" / "media"


@dataclass
class Settings:
    # Kafka
    kafka_bootstrap: str = field(default_factory=lambda: env("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    # The local broker holds every JoinGroup for half the session timeout; the first member of a group
    # fixes it for the broker's lifetime, so every process must use the same numbers (RUNTIME-NOTES).
    kafka_session_timeout_ms: int = field(default_factory=lambda: int(env("KAFKA_SESSION_TIMEOUT_MS", "2000")))
    kafka_heartbeat_ms: int = field(default_factory=lambda: int(env("KAFKA_HEARTBEAT_MS", "200")))
    # How long the broker may hold a consumer's fetch when there is nothing to read. Apache Kafka answers a
    # held fetch as soon as a record arrives, so 500 costs no latency there and idle consumers fetch ten
    # times less often (bench/idle.py). The local broker does not: it answers when the wait is over (median
    # 118 ms a hop at 500, 11 ms at 50, measured), so the default suits it; deploy/ sets 500.
    kafka_fetch_wait_ms: int = field(default_factory=lambda: int(env("KAFKA_FETCH_WAIT_MS", "50")))
    # How often every Kafka client asks the broker for the metadata of the topics it knows (librdkafka's
    # topic.metadata.refresh.interval.ms). Longer costs the broker less on an idle stack (10 s: about a point
    # of a core less, bench/idle.py), but after the local broker lost its data the gateway's producer kept
    # the old posemesh.control for that long (an upload refused for 10 s, the task run again 20 s late in
    # test_resilience's broker restart, against 1 s at 500 ms).
    kafka_metadata_refresh_ms: int = field(default_factory=lambda: int(env("KAFKA_METADATA_REFRESH_MS", "500")))
    # A stage worker's producer is replaced (between two steps, with everything it sent acknowledged) once it has
    # written to this many topics: librdkafka asks the broker for the metadata of every topic a client ever
    # wrote to, deleted ones included, for as long as the client lives (a worker writes a topic or two a task;
    # after 5000 one producer spent 12% of a core on them: bench/README.md, "Stale topics").
    producer_topics_max: int = field(default_factory=lambda: int(env("PRODUCER_TOPICS_MAX", "200")))
    # Consumer groups are named <prefix>-<stage>: two stacks can share one broker under different prefixes.
    group_prefix: str = field(default_factory=lambda: env("GROUP_PREFIX", "posemesh"))
    frame_partitions: int = field(default_factory=lambda: int(env("FRAME_PARTITIONS", "4")))
    topic_retention_ms: int = field(default_factory=lambda: int(env("TOPIC_RETENTION_MS", str(24 * 3600 * 1000))))
    # Task ids kept in reserve with their topics made and read by every stage (gateway/reservations.py):
    # a task that takes one starts without waiting for consumer-group joins. Made again once no task has
    # started for the quiet time (workers let go of ended tasks' topics a second after it, in the same
    # rebalance). 0 turns reservations off.
    reserved_tasks: int = field(default_factory=lambda: int(env("RESERVED_TASKS", "4")))
    reserve_quiet_s: float = field(default_factory=lambda: float(env("RESERVE_QUIET_S", "5.0")))
    # Seconds between a task's terminal state and the deletion of its topics.
    topic_delete_delay_s: float = field(default_factory=lambda: float(env("TOPIC_DELETE_DELAY_S", "60")))
    # How long a stage worker may keep an ended task's topics subscribed (held: nothing fetched) while other tasks
    # it reads still run: letting go is a rebalance that stops the whole group for a second (a live camera's lag
    # grows by it), so endings are gathered until the running tasks end too, or this long after the first of them.
    # 0: let go a few seconds after an ending, whatever runs (stages/worker.py).
    ended_topics_hold_s: float = field(default_factory=lambda: float(env("ENDED_TOPICS_HOLD_S", "60")))
    # Triton
    triton_url: str = field(default_factory=lambda: env("TRITON_URL", "127.0.0.1:8001"))
    # The shortest time an inference answer may take before Triton is asked whether it is still there (the
    # deadline grows with the observed round trip; a busy Triton is waited for); and how long Triton may be
    # unreachable or not ready before the tasks waiting on it are failed with that reason (four times as
    # long while it takes connections but answers nothing: starved or hung, stages/triton.py).
    triton_timeout_s: float = field(default_factory=lambda: float(env("TRITON_TIMEOUT_S", "10")))
    triton_outage_s: float = field(default_factory=lambda: float(env("TRITON_OUTAGE_S", "60")))
    # Requests one worker process keeps in Triton's queue per model; more wait in the worker (back-pressure).
    triton_max_in_flight: int = field(default_factory=lambda: int(env("TRITON_MAX_IN_FLIGHT", "4")))
    # Tensors to and from Triton through system shared memory: "auto" (probed once per model: used when
    # Triton can open a region this worker made, i.e. both see one /dev/shm: same host, or containers
    # sharing an IPC namespace), "on" (forced) or "off" (always the gRPC payload).
    triton_shm: str = field(default_factory=lambda: env("TRITON_SHM", "auto"))
    # The pose model of a task that names none: blazepose_lite, blazepose_full or rtmpose.
    default_pose_model: str = field(default_factory=lambda: env("DEFAULT_POSE_MODEL", "blazepose_lite"))
    # The detector's least person score (YOLOX objectness x person), for tasks whose min_person_score is 0;
    # also the tracker's threshold for starting a track. Towncentre, persons a frame: 8.4 at 0.5, 9.3 at
    # 0.4, 10.6 at 0.3 (vtest 6.2 / 6.7 / 6.8). bench/people.py: at 0.4 recall against an independent detector
    # rises 0.77 -> 0.82 on towncentre, but the tracker then makes 9 more ids that live under 1 s.
    detect_min_score: float = field(default_factory=lambda: float(env("DETECT_MIN_SCORE", "0.5")))
    # The detector also looks at 2x2 overlapping tiles of each frame (stages/detect.py): small people a 416 px
    # input loses are found (bench/people.py, towncentre 1080p: recall 0.77 -> 0.92, people 60-100 px tall
    # 0.52 -> 0.80) for about 5x the detector's work. Off by default: on CPUs the detector's time is the cost.
    detect_tiles: bool = field(default_factory=lambda: env("DETECT_TILES", "0").lower() in ("1", "true", "yes"))
    # Tracking (ByteTrack, stages/track.py). How long a track whose person is not detected is remembered, in
    # seconds of the video (any frame rate): a person unseen for longer gets a new id. 2 s bridges the 38-frame
    # detection gap (1.3 s at 30 fps) that split a person on towncentre with the former 30-frame (1 s) memory.
    # And the least IoU between a track's predicted box and a detection for them to match (the library's).
    track_memory_s: float = field(default_factory=lambda: float(env("TRACK_MEMORY_S", "2.0")))
    track_min_iou: float = field(default_factory=lambda: float(env("TRACK_MIN_IOU", "0.1")))
    # A track forgotten (unseen for longer than the memory) hands its id to a new track that starts where it
    # would be by now, within this many seconds (stages/track.py); 0: never.
    track_relink_s: float = field(default_factory=lambda: float(env("TRACK_RELINK_S", "0")))
    # BlazePose: a second pass on the region the first pass's landmarks give (centred on the hips, rotated
    # upright), as MediaPipe's own pipeline does. bench/accuracy.py: COCO keypoint AP 0.280 -> 0.374 (lite)
    # and 0.349 -> 0.400 (full) with our detector, for about twice the pose model's work per person.
    pose_refine: bool = field(default_factory=lambda: env("POSE_REFINE", "0").lower() in ("1", "true", "yes"))
    # Annotate's H.264 encoder: the x264 preset, and frames per segment (a segment is annotate's unit of
    # durability: a worker that takes a task over continues from the last finished segment).
    x264_preset: str = field(default_factory=lambda: env("X264_PRESET", "veryfast"))
    segment_frames: int = field(default_factory=lambda: int(env("SEGMENT_FRAMES", "60")))
    # Where detect hands frames' JPEGs to pose, and pose its decoded frames to annotate, on the same host
    # (stages/shared_pictures.py): a shared memory folder they all see, "" for never; and how much of it each
    # task's ring may take (a JPEG slot for every frame decoding may run ahead, the rest for pictures: 80 JPEGs and 45
    # pictures of 1080p in 320 MB).
    shared_pictures_dir: str = field(default_factory=lambda: env("SHARED_PICTURES_DIR", "/dev/shm/posemesh-pictures"))
    shared_pictures_mb: int = field(default_factory=lambda: int(env("SHARED_PICTURES_MB", "320")))
    # The address the control API (StageService, gRPC health) and the metrics endpoints listen on:
    # 127.0.0.1 on one machine, 0.0.0.0 where probes and scrapers come from elsewhere (Kubernetes, Compose).
    control_host: str = field(default_factory=lambda: env("CONTROL_HOST", "127.0.0.1"))
    # This process's own files (the gateway's task store, uploads as they arrive, scratch), and the default
    # blob store's root.
    data_dir: Path = field(default_factory=lambda: Path(env("DATA_DIR", str(RUN_DIR / "data"))))
    # Where uploads, result segments and results are stored (mesh/blobs.py): "" is the data directory (one
    # machine, or a volume every process mounts); s3://<bucket>[/<prefix>] needs no shared disk at all.
    blob_url: str = field(default_factory=lambda: env("BLOB_URL", ""))
    # An S3-compatible store that is not AWS (MinIO, Ceph, GCS's XML API): its URL.
    s3_endpoint_url: str = field(default_factory=lambda: env("S3_ENDPOINT_URL", ""))
    models_dir: Path = field(default_factory=default_models_dir)
    # Gateway
    # The task store (gateway/store.py): "" is SQLite in the data directory (one gateway);
    # postgresql://user:password@host:port/database is PostgreSQL, which several gateways can share.
    store_url: str = field(default_factory=lambda: env("STORE_URL", ""))
    gateway_listen: str = field(default_factory=lambda: env("GATEWAY_LISTEN", "127.0.0.1:50051"))
    gateway_metrics_port: int = field(default_factory=lambda: int(env("GATEWAY_METRICS_PORT", "0")))  # 0: off
    max_upload_bytes: int = field(default_factory=lambda: int(env("MAX_UPLOAD_BYTES", str(2 * 1024**3))))
    max_active_tasks_per_user: int = field(default_factory=lambda: int(env("MAX_ACTIVE_TASKS_PER_USER", "8")))
    # Streams (uploads, WatchTask, DownloadResult) one user may hold open at once.
    max_streams_per_user: int = field(default_factory=lambda: int(env("MAX_STREAMS_PER_USER", "64")))
    api_keys_file: str = field(default_factory=lambda: env("API_KEYS_FILE", ""))
    api_keys: str = field(default_factory=lambda: env("API_KEYS", ""))
    # Users (names from the API keys) whose GetStats shows every user's task counts, not only their own.
    admin_users: str = field(default_factory=lambda: env("ADMIN_USERS", ""))
    # The key(s) sealing the camera credentials the gateway stores (mesh/at_rest.py): a file of Fernet
    # keys, one per line, the first sealing (a Kubernetes or Compose secret). Empty: data_dir/secrets.key,
    # made on the first start with mode 0600 (one machine; keep it apart from the data in production).
    secrets_key_file: str = field(default_factory=lambda: env("SECRETS_KEY_FILE", ""))
    # Who decodes uploads into frames: "gateway" (each gateway decodes its own uploads: one machine, nothing
    # more to run) or "stage" (the ingest stage, python -m posemesh.stages ingest, any number of replicas on
    # any hosts: the gateway only probes an upload, stores it and hands it over on posemesh.ingest).
    ingest: str = field(default_factory=lambda: env("INGEST", "gateway"))
    # posemesh.ingest's partitions (the most ingest replicas that get work), and the uploads one replica
    # decodes at once.
    ingest_partitions: int = field(default_factory=lambda: int(env("INGEST_PARTITIONS", "8")))
    ingest_max_jobs: int = field(default_factory=lambda: int(env("INGEST_MAX_JOBS", "4")))
    # The frame producer stays at most this many frames ahead of the last stage (annotate): the pipeline gets
    # the CPU at a task's start (first results sooner), every stage gets its share all along (bench/README.md's
    # loop.py: measured ahead of detect, the first stages raced ahead and pose ran alone at the end with the CPUs
    # partly idle), and the broker holds a window, not the whole video.
    max_frames_ahead: int = field(default_factory=lambda: int(env("MAX_FRAMES_AHEAD", "64")))
    # Pose models this server refuses (comma-separated, e.g. "rtmpose" when only the untrained stand-in
    # is installed): a task asking for one fails at once instead of producing meaningless keypoints.
    disabled_pose_models: str = field(default_factory=lambda: env("DISABLED_POSE_MODELS", ""))
    # The frames' JPEG quality on raw_frames. 80: a third fewer bytes than 90 for the broker to write once and
    # serve three times, and slightly cheaper decodes; the keypoints move by a median 0.7% of the box height
    # from the uncompressed picture's (0.5% at 90) and detect finds the same persons (bench/jpeg_quality.py).
    jpeg_quality: int = field(default_factory=lambda: int(env("JPEG_QUALITY", str(JPEG_QUALITY))))
    # Live tasks. Sources the server may read, as scheme://host:port patterns (gateway/sources.py); empty
    # allows none. The lag bound (seconds the annotated output may trail the camera), how long a source may
    # send no frame (retried meanwhile) before the task ends (COMPLETED if its server still answers, FAILED
    # if not), and where annotate publishes each live task's annotated video and where players find it
    # (default: the same URL). "{task}" is replaced by "<task id>/<stream token>": the token is the task's
    # secret, so a stream URL cannot be guessed from a task id. Empty publish URL: not published.
    live_sources: str = field(default_factory=lambda: env("LIVE_SOURCES", ""))
    live_max_lag_s: float = field(default_factory=lambda: float(env("LIVE_MAX_LAG_S", "2.0")))
    live_outage_s: float = field(default_factory=lambda: float(env("LIVE_OUTAGE_S", "20")))
    live_publish_url: str = field(default_factory=lambda: env("LIVE_PUBLISH_URL", ""))
    live_stream_url: str = field(default_factory=lambda: env("LIVE_STREAM_URL", ""))
    # Completion webhooks (gateway/webhooks.py). Where a task's callback_url may point: comma-separated
    # scheme://host:port patterns (http or https; host and port may hold *), empty = no webhooks. A private,
    # loopback or link-local address is reached only when a pattern names it as an address (e.g.
    # http://10.0.0.*:*), checked on the addresses the host resolves to at each attempt. Retries back off
    # exponentially from webhook_backoff_s (capped at 10 minutes) for at most webhook_retry_s after the task
    # ended; each POST may take webhook_timeout_s; webhook_workers POSTs run at once.
    webhook_targets: str = field(default_factory=lambda: env("WEBHOOK_TARGETS", ""))
    webhook_retry_s: float = field(default_factory=lambda: float(env("WEBHOOK_RETRY_S", "3600")))
    webhook_backoff_s: float = field(default_factory=lambda: float(env("WEBHOOK_BACKOFF_S", "5")))
    webhook_timeout_s: float = field(default_factory=lambda: float(env("WEBHOOK_TIMEOUT_S", "10")))
    webhook_workers: int = field(default_factory=lambda: int(env("WEBHOOK_WORKERS", "8")))
    # Annotated frames a WatchFrames reader may have waiting before the oldest are dropped.
    live_view_queue: int = field(default_factory=lambda: int(env("LIVE_VIEW_QUEUE", "8")))
    # A running task none of whose frames got further through any step for this long is failed.
    stall_timeout_s: float = field(default_factory=lambda: float(env("STALL_TIMEOUT_S", "300")))
    # Caps on what an upload may be, checked before any work starts (INVALID_ARGUMENT naming the cap).
    # They bound every process's memory: a frame is at most max_frame_pixels (4K UHD by default).
    max_frame_pixels: int = field(default_factory=lambda: int(env("MAX_FRAME_PIXELS", str(3840 * 2160))))
    max_frame_side: int = field(default_factory=lambda: int(env("MAX_FRAME_SIDE", "4096")))
    max_frames: int = field(default_factory=lambda: int(env("MAX_FRAMES", str(60 * 60 * 30))))
    max_duration_s: float = field(default_factory=lambda: float(env("MAX_DURATION_S", "3600")))
    max_fps: float = field(default_factory=lambda: float(env("MAX_FPS", "120")))
    # A stalled or trickling upload holds one of its user's task slots: after the first upload_grace_s,
    # an upload must have sent upload_min_bytes_per_s on average, or it ends with DEADLINE_EXCEEDED and
    # frees the slot (64 KiB/s: a 100 MB clip on the slowest link this accepts takes 26 minutes).
    upload_min_bytes_per_s: int = field(default_factory=lambda: int(env("UPLOAD_MIN_BYTES_PER_S", str(64 * 1024))))
    upload_grace_s: float = field(default_factory=lambda: float(env("UPLOAD_GRACE_S", "10")))

    def max_batch(self, stage: str, default: int) -> int:
        """POSEMESH_<STAGE>_MAX_BATCH: the most frames a stage processes in one batch (default: the stage's own)."""
        return int(env(f"{stage.upper()}_MAX_BATCH", str(default)))

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def results_dir(self) -> Path:
        """The default blob store's results folder (mesh/blobs.py): what tests look into."""
        return self.data_dir / "results"

    @property
    def scratch_dir(self) -> Path:
        """Files a process writes for itself only (a segment being coded, a result being assembled)."""
        return self.data_dir / "scratch"

    def ingest_stage(self) -> bool:
        """Whether uploads are decoded by the ingest stage (else by the gateway that took them)."""
        if self.ingest not in ("gateway", "stage"):
            raise ValueError(f"POSEMESH_INGEST is {self.ingest!r}: it must be 'gateway' or 'stage'")
        return self.ingest == "stage"

    def blob_store(self):
        from posemesh.mesh.blobs import open_blob_store

        return open_blob_store(self.blob_url, self.data_dir, self.s3_endpoint_url)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"

    @property
    def store_location(self) -> Path | str:
        """Where the gateway's task store is: POSEMESH_STORE_URL, else the SQLite file in the data directory."""
        return self.store_url or self.db_path
