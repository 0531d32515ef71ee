from posemesh.v1 import task_service_pb2 as _task_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameRef(_message.Message):
    __slots__ = ("partition", "offset")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    partition: int
    offset: int
    def __init__(self, partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("index", "timestamp_s", "width", "height", "jpeg", "persons", "source")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_s: float
    width: int
    height: int
    jpeg: bytes
    persons: _containers.RepeatedCompositeFieldContainer[_task_service_pb2.Person]
    source: FrameRef
    def __init__(self, index: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., persons: _Optional[_Iterable[_Union[_task_service_pb2.Person, _Mapping]]] = ..., source: _Optional[_Union[FrameRef, _Mapping]] = ...) -> None: ...

class EndOfStream(_message.Message):
    __slots__ = ("total_frames", "fps")
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    total_frames: int
    fps: float
    def __init__(self, total_frames: _Optional[int] = ..., fps: _Optional[float] = ...) -> None: ...

class StageRecord(_message.Message):
    __slots__ = ("task_id", "options", "frame", "end_of_stream", "epoch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    options: _task_service_pb2.TaskOptions
    frame: Frame
    end_of_stream: EndOfStream
    epoch: int
    def __init__(self, task_id: _Optional[str] = ..., options: _Optional[_Union[_task_service_pb2.TaskOptions, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., end_of_stream: _Optional[_Union[EndOfStream, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class TaskStarted(_message.Message):
    __slots__ = ("options", "video", "epoch", "live", "publish_url")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_URL_FIELD_NUMBER: _ClassVar[int]
    options: _task_service_pb2.TaskOptions
    video: _task_service_pb2.VideoInfo
    epoch: int
    live: bool
    publish_url: str
    def __init__(self, options: _Optional[_Union[_task_service_pb2.TaskOptions, _Mapping]] = ..., video: _Optional[_Union[_task_service_pb2.VideoInfo, _Mapping]] = ..., epoch: _Optional[int] = ..., live: _Optional[bool] = ..., publish_url: _Optional[str] = ...) -> None: ...

class ViewersChanged(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class TaskEnded(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _task_service_pb2.TaskState
    def __init__(self, state: _Optional[_Union[_task_service_pb2.TaskState, str]] = ...) -> None: ...

class TaskReserved(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SourceStopped(_message.Message):
    __slots__ = ("reason", "state")
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    state: _task_service_pb2.TaskState
    def __init__(self, reason: _Optional[str] = ..., state: _Optional[_Union[_task_service_pb2.TaskState, str]] = ...) -> None: ...

class ControlEvent(_message.Message):
    __slots__ = ("task_id", "started", "ended", "viewers", "reserved", "source_stopped")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    VIEWERS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_STOPPED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    started: TaskStarted
    ended: TaskEnded
    viewers: ViewersChanged
    reserved: TaskReserved
    source_stopped: SourceStopped
    def __init__(self, task_id: _Optional[str] = ..., started: _Optional[_Union[TaskStarted, _Mapping]] = ..., ended: _Optional[_Union[TaskEnded, _Mapping]] = ..., viewers: _Optional[_Union[ViewersChanged, _Mapping]] = ..., reserved: _Optional[_Union[TaskReserved, _Mapping]] = ..., source_stopped: _Optional[_Union[SourceStopped, _Mapping]] = ...) -> None: ...

class IngestJob(_message.Message):
    __slots__ = ("task", "epoch", "upload_key", "live")
    TASK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    task: _task_service_pb2.Task
    epoch: int
    upload_key: str
    live: LiveJob
    def __init__(self, task: _Optional[_Union[_task_service_pb2.Task, _Mapping]] = ..., epoch: _Optional[int] = ..., upload_key: _Optional[str] = ..., live: _Optional[_Union[LiveJob, _Mapping]] = ...) -> None: ...

class LiveJob(_message.Message):
    __slots__ = ("sealed_url", "transport")
    SEALED_URL_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    sealed_url: str
    transport: _task_service_pb2.RtspTransport
    def __init__(self, sealed_url: _Optional[str] = ..., transport: _Optional[_Union[_task_service_pb2.RtspTransport, str]] = ...) -> None: ...

class IndexRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class TaskProgress(_message.Message):
    __slots__ = ("task_id", "frames_done", "frames_total", "done", "epoch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    frames_done: int
    frames_total: int
    done: _containers.RepeatedCompositeFieldContainer[IndexRange]
    epoch: int
    def __init__(self, task_id: _Optional[str] = ..., frames_done: _Optional[int] = ..., frames_total: _Optional[int] = ..., done: _Optional[_Iterable[_Union[IndexRange, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "artifacts", "frames_written", "warnings", "epoch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    artifacts: _containers.RepeatedCompositeFieldContainer[_task_service_pb2.Artifact]
    frames_written: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    def __init__(self, task_id: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[_task_service_pb2.Artifact, _Mapping]]] = ..., frames_written: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class TaskFailure(_message.Message):
    __slots__ = ("task_id", "error_message", "epoch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    error_message: str
    epoch: int
    def __init__(self, task_id: _Optional[str] = ..., error_message: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("reading_tasks", "waiting_tasks", "ingest_partitions")
    READING_TASKS_FIELD_NUMBER: _ClassVar[int]
    WAITING_TASKS_FIELD_NUMBER: _ClassVar[int]
    INGEST_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    reading_tasks: _containers.RepeatedScalarFieldContainer[str]
    waiting_tasks: _containers.RepeatedScalarFieldContainer[str]
    ingest_partitions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reading_tasks: _Optional[_Iterable[str]] = ..., waiting_tasks: _Optional[_Iterable[str]] = ..., ingest_partitions: _Optional[_Iterable[int]] = ...) -> None: ...

class SourceRead(_message.Message):
    __slots__ = ("task_id", "epoch", "frame_count", "duration_s", "warning", "produced")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    epoch: int
    frame_count: int
    duration_s: float
    warning: str
    produced: bool
    def __init__(self, task_id: _Optional[str] = ..., epoch: _Optional[int] = ..., frame_count: _Optional[int] = ..., duration_s: _Optional[float] = ..., warning: _Optional[str] = ..., produced: _Optional[bool] = ...) -> None: ...

class LiveRead(_message.Message):
    __slots__ = ("task_id", "epoch", "reader", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    READER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    epoch: int
    reader: str
    status: _task_service_pb2.LiveStatus
    def __init__(self, task_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reader: _Optional[str] = ..., status: _Optional[_Union[_task_service_pb2.LiveStatus, _Mapping]] = ...) -> None: ...

class SourceEnded(_message.Message):
    __slots__ = ("task_id", "epoch", "state", "message", "total")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    epoch: int
    state: _task_service_pb2.TaskState
    message: str
    total: int
    def __init__(self, task_id: _Optional[str] = ..., epoch: _Optional[int] = ..., state: _Optional[_Union[_task_service_pb2.TaskState, str]] = ..., message: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("worker_id", "stage", "heartbeat", "progress", "result", "failure", "source_read", "live_read", "source_ended")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_READ_FIELD_NUMBER: _ClassVar[int]
    LIVE_READ_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ENDED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stage: str
    heartbeat: Heartbeat
    progress: TaskProgress
    result: TaskResult
    failure: TaskFailure
    source_read: SourceRead
    live_read: LiveRead
    source_ended: SourceEnded
    def __init__(self, worker_id: _Optional[str] = ..., stage: _Optional[str] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., failure: _Optional[_Union[TaskFailure, _Mapping]] = ..., source_read: _Optional[_Union[SourceRead, _Mapping]] = ..., live_read: _Optional[_Union[LiveRead, _Mapping]] = ..., source_ended: _Optional[_Union[SourceEnded, _Mapping]] = ...) -> None: ...
