from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageTask(_message.Message):
    __slots__ = ("task_id", "frames_done", "frames_total", "duplicates_dropped", "failure")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    frames_done: int
    frames_total: int
    duplicates_dropped: int
    failure: str
    def __init__(self, task_id: _Optional[str] = ..., frames_done: _Optional[int] = ..., frames_total: _Optional[int] = ..., duplicates_dropped: _Optional[int] = ..., failure: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("worker_id", "stage", "frames_processed", "batches", "mean_batch_size", "tasks", "uptime_s", "serving", "problem", "resets", "assignments", "subscription_changes", "consumer_group", "pixel_frames_read", "pixel_bytes_read", "pictures_shared", "jpegs_shared", "reading_tasks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_CHANGES_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    PIXEL_FRAMES_READ_FIELD_NUMBER: _ClassVar[int]
    PIXEL_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    PICTURES_SHARED_FIELD_NUMBER: _ClassVar[int]
    JPEGS_SHARED_FIELD_NUMBER: _ClassVar[int]
    READING_TASKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stage: str
    frames_processed: int
    batches: int
    mean_batch_size: float
    tasks: _containers.RepeatedCompositeFieldContainer[StageTask]
    uptime_s: float
    serving: bool
    problem: str
    resets: int
    assignments: int
    subscription_changes: int
    consumer_group: str
    pixel_frames_read: int
    pixel_bytes_read: int
    pictures_shared: int
    jpegs_shared: int
    reading_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., stage: _Optional[str] = ..., frames_processed: _Optional[int] = ..., batches: _Optional[int] = ..., mean_batch_size: _Optional[float] = ..., tasks: _Optional[_Iterable[_Union[StageTask, _Mapping]]] = ..., uptime_s: _Optional[float] = ..., serving: _Optional[bool] = ..., problem: _Optional[str] = ..., resets: _Optional[int] = ..., assignments: _Optional[int] = ..., subscription_changes: _Optional[int] = ..., consumer_group: _Optional[str] = ..., pixel_frames_read: _Optional[int] = ..., pixel_bytes_read: _Optional[int] = ..., pictures_shared: _Optional[int] = ..., jpegs_shared: _Optional[int] = ..., reading_tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStageTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStageTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[StageTask]
    def __init__(self, tasks: _Optional[_Iterable[_Union[StageTask, _Mapping]]] = ...) -> None: ...

class StopTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StopTaskResponse(_message.Message):
    __slots__ = ("was_active",)
    WAS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    was_active: bool
    def __init__(self, was_active: _Optional[bool] = ...) -> None: ...
