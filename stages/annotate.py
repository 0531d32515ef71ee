"""Annotate stage: bytetrack_<task> -> results. Draws, encodes H.264 MP4 and writes keypoints JSON lines.

Frames arrive in index order (runtime). Output files grow in a hidden partial folder and are moved into
results/<task>/ only when complete, so a reader never sees half a result; the input offsets are
committed only then (`commit_at_task_end`): a crash mid-task redoes the task from its first frame.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from posemesh import kafka
from posemesh.models import sha256_of
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.stages.pose import COCO_SKELETON
from posemesh.stages.runtime import FrameItem, Stage, TaskContext

VIDEO_FILE, KEYPOINTS_FILE = "annotated.mp4", "keypoints.jsonl"
ARTIFACT_FILES = {tpb.ARTIFACT_KIND_ANNOTATED_VIDEO: (VIDEO_FILE, "video/mp4"),
                  tpb.ARTIFACT_KIND_KEYPOINTS: (KEYPOINTS_FILE, "application/jsonl")}
KEYPOINT_MIN_SCORE = 0.3


def wanted_outputs(options: tpb.TaskOptions) -> set[int]:
    return set(options.outputs) - {tpb.ARTIFACT_KIND_UNSPECIFIED} or set(ARTIFACT_FILES)


def colour(track_id: int) -> tuple[int, int, int]:
    if track_id <= 0:
        return (160, 160, 160)
    hue = (track_id * 47) % 180  # well-spread hues for consecutive ids
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0])


def draw(image: np.ndarray, persons) -> np.ndarray:
    for p in persons:
        c = colour(p.track_id)
        x1, y1, x2, y2 = (int(round(v)) for v in (p.box.x1, p.box.y1, p.box.x2, p.box.y2))
        cv2.rectangle(image, (x1, y1), (x2, y2), c, 2)
        label = f"#{p.track_id}" if p.track_id else f"{p.score:.2f}"
        cv2.putText(image, label, (x1, max(12, y1 - 5)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, c, 2, cv2.LINE_AA)
        kps = p.keypoints
        if len(kps) == 17:
            for a, b in COCO_SKELETON:
                if kps[a].score > KEYPOINT_MIN_SCORE and kps[b].score > KEYPOINT_MIN_SCORE:
                    cv2.line(image, (int(kps[a].x), int(kps[a].y)), (int(kps[b].x), int(kps[b].y)), c, 2, cv2.LINE_AA)
            for k in kps:
                if k.score > KEYPOINT_MIN_SCORE:
                    cv2.circle(image, (int(k.x), int(k.y)), 3, (255, 255, 255), -1, cv2.LINE_AA)
    return image


def keypoints_record(frame: pb.Frame) -> dict:
    return {
        "index": frame.index,
        "timestamp_s": round(frame.timestamp_s, 6),
        "persons": [{
            "track_id": p.track_id,
            "box": [round(p.box.x1, 2), round(p.box.y1, 2), round(p.box.x2, 2), round(p.box.y2, 2)],
            "score": round(p.score, 4),
            "keypoints": [[round(k.x, 2), round(k.y, 2), round(k.score, 4)] for k in p.keypoints],
        } for p in frame.persons],
    }


@dataclass
class TaskOutput:
    partial: Path
    final: Path
    outputs: set
    container: object = None
    stream: object = None
    jsonl: object = None
    frames: int = 0


class AnnotateStage(Stage):
    name = "annotate"
    input_prefix = kafka.BYTETRACK
    output_prefix = None
    ordered = True
    commit_at_task_end = True
    max_batch = 16

    def __init__(self, x264_preset: str | None = None):
        self.preset = x264_preset or os.environ.get("POSEMESH_X264_PRESET", "veryfast")

    def setup(self, settings) -> None:
        self.results_dir = settings.results_dir
        self.outputs: dict[str, TaskOutput] = {}

    def open_task(self, task: TaskContext, first: pb.Frame) -> TaskOutput:
        final = self.results_dir / task.task_id
        partial = self.results_dir / f".partial-{task.task_id}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        out = TaskOutput(partial, final, wanted_outputs(task.options))
        if tpb.ARTIFACT_KIND_ANNOTATED_VIDEO in out.outputs:
            out.container = av.open(str(partial / VIDEO_FILE), "w")
            fps = Fraction(task.fps or 30.0).limit_denominator(1001)
            out.stream = out.container.add_stream("libx264", rate=fps)
            # yuv420p needs even sizes: odd ones are padded by one pixel.
            out.stream.width, out.stream.height = first.width + first.width % 2, first.height + first.height % 2
            out.stream.pix_fmt = "yuv420p"
            out.stream.options = {"preset": self.preset, "crf": "23"}
        if tpb.ARTIFACT_KIND_KEYPOINTS in out.outputs:
            out.jsonl = open(partial / KEYPOINTS_FILE, "w")
        self.outputs[task.task_id] = out
        return out

    def process(self, items: list[FrameItem], tasks: dict[str, TaskContext]) -> None:
        for item in items:  # in index order within each task
            frame = item.frame
            out = self.outputs.get(item.task_id) or self.open_task(tasks[item.task_id], frame)
            image = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR) if out.stream else None
            self.write(out, frame, image)

    def write(self, out: TaskOutput, frame: pb.Frame, image: np.ndarray | None) -> None:
        """Append one frame (its decoded image, for the video) to a task's outputs."""
        if out.stream is not None:
            if image.shape[1] != out.stream.width or image.shape[0] != out.stream.height:
                image = cv2.copyMakeBorder(image, 0, out.stream.height - image.shape[0], 0,
                                           out.stream.width - image.shape[1], cv2.BORDER_REPLICATE)
            video_frame = av.VideoFrame.from_ndarray(draw(image, frame.persons), format="bgr24")
            video_frame.pts = out.frames
            for packet in out.stream.encode(video_frame):
                out.container.mux(packet)
        if out.jsonl is not None:
            out.jsonl.write(json.dumps(keypoints_record(frame), separators=(",", ":")) + "\n")
        out.frames += 1

    def finish_task(self, task: TaskContext) -> pb.TaskResult:
        out = self.outputs.pop(task.task_id, None)
        if out is None:  # a video of zero frames
            out = TaskOutput(self.results_dir / f".partial-{task.task_id}-{os.getpid()}",
                             self.results_dir / task.task_id, wanted_outputs(task.options))
            out.partial.mkdir(parents=True, exist_ok=True)
        if out.stream is not None:
            for packet in out.stream.encode(None):
                out.container.mux(packet)
            out.container.close()
        if out.jsonl is not None:
            out.jsonl.close()
        artifacts = []
        for kind in sorted(out.outputs):
            name, content_type = ARTIFACT_FILES[kind]
            path = out.partial / name
            if not path.exists():
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            artifacts.append(tpb.Artifact(kind=kind, file_name=name, size_bytes=path.stat().st_size,
                                          content_type=content_type, sha256=sha256_of(path)))
        # One rename makes the whole result visible at once.
        shutil.rmtree(out.final, ignore_errors=True)
        os.replace(out.partial, out.final)
        return pb.TaskResult(task_id=task.task_id, artifacts=artifacts, frames_written=out.frames)

    def drop_task(self, task_id: str) -> None:
        out = self.outputs.pop(task_id, None)
        if out is None:
            return
        try:
            if out.container is not None:
                out.container.close()
            if out.jsonl is not None:
                out.jsonl.close()
        finally:
            shutil.rmtree(out.partial, ignore_errors=True)

    def close(self) -> None:
        for task_id in list(self.outputs):
            self.drop_task(task_id)
