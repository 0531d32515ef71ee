import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_COMPLETED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]

class PoseModel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSE_MODEL_UNSPECIFIED: _ClassVar[PoseModel]
    POSE_MODEL_BLAZEPOSE_LITE: _ClassVar[PoseModel]
    POSE_MODEL_BLAZEPOSE_FULL: _ClassVar[PoseModel]
    POSE_MODEL_RTMPOSE: _ClassVar[PoseModel]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_ANNOTATED_VIDEO: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_KEYPOINTS: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_COCO_KEYPOINTS: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_MOT_TRACKS: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_KEYPOINTS_CSV: _ClassVar[ArtifactKind]

class WebhookState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_STATE_UNSPECIFIED: _ClassVar[WebhookState]
    WEBHOOK_STATE_PENDING: _ClassVar[WebhookState]
    WEBHOOK_STATE_DELIVERED: _ClassVar[WebhookState]
    WEBHOOK_STATE_FAILED: _ClassVar[WebhookState]

class RtspTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RTSP_TRANSPORT_UNSPECIFIED: _ClassVar[RtspTransport]
    RTSP_TRANSPORT_TCP: _ClassVar[RtspTransport]
    RTSP_TRANSPORT_UDP: _ClassVar[RtspTransport]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_COMPLETED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
POSE_MODEL_UNSPECIFIED: PoseModel
POSE_MODEL_BLAZEPOSE_LITE: PoseModel
POSE_MODEL_BLAZEPOSE_FULL: PoseModel
POSE_MODEL_RTMPOSE: PoseModel
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_ANNOTATED_VIDEO: ArtifactKind
ARTIFACT_KIND_KEYPOINTS: ArtifactKind
ARTIFACT_KIND_COCO_KEYPOINTS: ArtifactKind
ARTIFACT_KIND_MOT_TRACKS: ArtifactKind
ARTIFACT_KIND_KEYPOINTS_CSV: ArtifactKind
WEBHOOK_STATE_UNSPECIFIED: WebhookState
WEBHOOK_STATE_PENDING: WebhookState
WEBHOOK_STATE_DELIVERED: WebhookState
WEBHOOK_STATE_FAILED: WebhookState
RTSP_TRANSPORT_UNSPECIFIED: RtspTransport
RTSP_TRANSPORT_TCP: RtspTransport
RTSP_TRANSPORT_UDP: RtspTransport

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("x", "y", "score")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    score: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("box", "score", "keypoints", "track_id")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    track_id: int
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ..., track_id: _Optional[int] = ...) -> None: ...

class TaskOptions(_message.Message):
    __slots__ = ("pose_model", "outputs", "min_person_score", "region_of_interest", "max_persons", "sample_fps", "given_boxes", "boxes_given")
    POSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MIN_PERSON_SCORE_FIELD_NUMBER: _ClassVar[int]
    REGION_OF_INTEREST_FIELD_NUMBER: _ClassVar[int]
    MAX_PERSONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FPS_FIELD_NUMBER: _ClassVar[int]
    GIVEN_BOXES_FIELD_NUMBER: _ClassVar[int]
    BOXES_GIVEN_FIELD_NUMBER: _ClassVar[int]
    pose_model: PoseModel
    outputs: _containers.RepeatedScalarFieldContainer[ArtifactKind]
    min_person_score: float
    region_of_interest: _containers.RepeatedCompositeFieldContainer[Point]
    max_persons: int
    sample_fps: float
    given_boxes: _containers.RepeatedCompositeFieldContainer[FrameBoxes]
    boxes_given: BoxesGiven
    def __init__(self, pose_model: _Optional[_Union[PoseModel, str]] = ..., outputs: _Optional[_Iterable[_Union[ArtifactKind, str]]] = ..., min_person_score: _Optional[float] = ..., region_of_interest: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., max_persons: _Optional[int] = ..., sample_fps: _Optional[float] = ..., given_boxes: _Optional[_Iterable[_Union[FrameBoxes, _Mapping]]] = ..., boxes_given: _Optional[_Union[BoxesGiven, _Mapping]] = ...) -> None: ...

class FrameBoxes(_message.Message):
    __slots__ = ("frame_index", "boxes")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, frame_index: _Optional[int] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class BoxesGiven(_message.Message):
    __slots__ = ("boxes", "frames", "sha256")
    BOXES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    boxes: int
    frames: int
    sha256: str
    def __init__(self, boxes: _Optional[int] = ..., frames: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class UploadMetadata(_message.Message):
    __slots__ = ("file_name", "options", "idempotency_key", "callback_url")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    options: TaskOptions
    idempotency_key: str
    callback_url: str
    def __init__(self, file_name: _Optional[str] = ..., options: _Optional[_Union[TaskOptions, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., callback_url: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class StageProgress(_message.Message):
    __slots__ = ("stage", "frames_done", "frames_total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    frames_done: int
    frames_total: int
    def __init__(self, stage: _Optional[str] = ..., frames_done: _Optional[int] = ..., frames_total: _Optional[int] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("kind", "file_name", "size_bytes", "content_type", "sha256")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: ArtifactKind
    file_name: str
    size_bytes: int
    content_type: str
    sha256: str
    def __init__(self, kind: _Optional[_Union[ArtifactKind, str]] = ..., file_name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., content_type: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class VideoInfo(_message.Message):
    __slots__ = ("width", "height", "fps", "frame_count", "codec", "rotation", "duration_s", "audio_codec", "start_s")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CODEC_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    fps: float
    frame_count: int
    codec: str
    rotation: int
    duration_s: float
    audio_codec: str
    start_s: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[float] = ..., frame_count: _Optional[int] = ..., codec: _Optional[str] = ..., rotation: _Optional[int] = ..., duration_s: _Optional[float] = ..., audio_codec: _Optional[str] = ..., start_s: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "state", "file_name", "options", "video", "progress", "artifacts", "error_message", "created_at", "started_at", "finished_at", "upload_bytes", "warnings", "live", "stream_url", "ending", "stream_token", "webhook")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    STREAM_URL_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    STREAM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    file_name: str
    options: TaskOptions
    video: VideoInfo
    progress: _containers.RepeatedCompositeFieldContainer[StageProgress]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    error_message: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    upload_bytes: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    live: LiveStatus
    stream_url: str
    ending: TaskState
    stream_token: str
    webhook: WebhookDelivery
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., file_name: _Optional[str] = ..., options: _Optional[_Union[TaskOptions, _Mapping]] = ..., video: _Optional[_Union[VideoInfo, _Mapping]] = ..., progress: _Optional[_Iterable[_Union[StageProgress, _Mapping]]] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., error_message: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., upload_bytes: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., live: _Optional[_Union[LiveStatus, _Mapping]] = ..., stream_url: _Optional[str] = ..., ending: _Optional[_Union[TaskState, str]] = ..., stream_token: _Optional[str] = ..., webhook: _Optional[_Union[WebhookDelivery, _Mapping]] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("url", "state", "attempts", "last_status", "last_error", "delivered_at", "next_attempt_at")
    URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    url: str
    state: WebhookState
    attempts: int
    last_status: int
    last_error: str
    delivered_at: _timestamp_pb2.Timestamp
    next_attempt_at: _timestamp_pb2.Timestamp
    def __init__(self, url: _Optional[str] = ..., state: _Optional[_Union[WebhookState, str]] = ..., attempts: _Optional[int] = ..., last_status: _Optional[int] = ..., last_error: _Optional[str] = ..., delivered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LiveSource(_message.Message):
    __slots__ = ("url", "transport")
    URL_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    url: str
    transport: RtspTransport
    def __init__(self, url: _Optional[str] = ..., transport: _Optional[_Union[RtspTransport, str]] = ...) -> None: ...

class LiveStatus(_message.Message):
    __slots__ = ("source", "connected", "frames_received", "frames_dropped", "lag_s", "max_lag_s", "reconnects")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LAG_S_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_S_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    source: str
    connected: bool
    frames_received: int
    frames_dropped: int
    lag_s: float
    max_lag_s: float
    reconnects: int
    def __init__(self, source: _Optional[str] = ..., connected: _Optional[bool] = ..., frames_received: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., lag_s: _Optional[float] = ..., max_lag_s: _Optional[float] = ..., reconnects: _Optional[int] = ...) -> None: ...

class StartLiveTaskRequest(_message.Message):
    __slots__ = ("source", "options", "name", "max_lag_s", "callback_url")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_S_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    source: LiveSource
    options: TaskOptions
    name: str
    max_lag_s: float
    callback_url: str
    def __init__(self, source: _Optional[_Union[LiveSource, _Mapping]] = ..., options: _Optional[_Union[TaskOptions, _Mapping]] = ..., name: _Optional[str] = ..., max_lag_s: _Optional[float] = ..., callback_url: _Optional[str] = ...) -> None: ...

class StartLiveTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class WatchFramesRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class AnnotatedFrame(_message.Message):
    __slots__ = ("index", "timestamp_s", "width", "height", "jpeg", "persons", "annotated_at")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATED_AT_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_s: float
    width: int
    height: int
    jpeg: bytes
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    annotated_at: float
    def __init__(self, index: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., annotated_at: _Optional[float] = ...) -> None: ...

class WatchFramesResponse(_message.Message):
    __slots__ = ("frame", "dropped")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    frame: AnnotatedFrame
    dropped: int
    def __init__(self, frame: _Optional[_Union[AnnotatedFrame, _Mapping]] = ..., dropped: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: TaskState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserTaskCounts(_message.Message):
    __slots__ = ("user", "queued", "running", "completed", "failed", "cancelled")
    USER_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    user: str
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int
    def __init__(self, user: _Optional[str] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("stage", "workers_alive", "frames_per_second", "frames_waiting")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_ALIVE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FRAMES_WAITING_FIELD_NUMBER: _ClassVar[int]
    stage: str
    workers_alive: int
    frames_per_second: float
    frames_waiting: int
    def __init__(self, stage: _Optional[str] = ..., workers_alive: _Optional[int] = ..., frames_per_second: _Optional[float] = ..., frames_waiting: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("tasks", "stages", "window_s", "at")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[UserTaskCounts]
    stages: _containers.RepeatedCompositeFieldContainer[StageStats]
    window_s: float
    at: _timestamp_pb2.Timestamp
    def __init__(self, tasks: _Optional[_Iterable[_Union[UserTaskCounts, _Mapping]]] = ..., stages: _Optional[_Iterable[_Union[StageStats, _Mapping]]] = ..., window_s: _Optional[float] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WatchTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownloadResultRequest(_message.Message):
    __slots__ = ("task_id", "kind")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: ArtifactKind
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ...) -> None: ...

class DownloadResultResponse(_message.Message):
    __slots__ = ("artifact", "chunk")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    chunk: bytes
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
