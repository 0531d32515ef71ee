"""MediaPipe's own BlazePose pipeline on a batch of person crops; run by bench/mediapipe_agreement.py in the
bench-only environment `.venv-mediapipe` (`make bench-mediapipe`: mediapipe 0.10.14 pins its own numpy and
protobuf, so it stays out of the project's environment).

    .venv-mediapipe/bin/python bench/mediapipe_pose.py crops.npz landmarks.npz

crops.npz holds `crops` [N, S, S, 3] (RGB uint8) and `complexity` (0: lite, 1: full). landmarks.npz gets
`landmarks` [N, 33, 3] (x, y in crop pixels, visibility), NaN where MediaPipe found no person. Imports
nothing of posemesh: it runs under another interpreter.
"""

from __future__ import annotations

import sys

import mediapipe as mp
import numpy as np


def main() -> None:
    source, target = sys.argv[1:3]
    data = np.load(source)
    crops, complexity = data["crops"], int(data["complexity"])
    out = np.full((len(crops), 33, 3), np.nan, np.float32)
    # static_image_mode: each crop on its own (detector, then the landmark model on the region it derives),
    # as MediaPipe runs a still picture.
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=complexity,
                                min_detection_confidence=0.5) as pose:
        for i, crop in enumerate(crops):
            found = pose.process(crop).pose_landmarks
            if found is None:
                continue
            h, w = crop.shape[:2]
            out[i] = [(p.x * w, p.y * h, p.visibility) for p in found.landmark]
    np.savez(target, landmarks=out)


if __name__ == "__main__":
    main()
