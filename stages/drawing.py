"""What annotate draws on a frame: each person's box, its track id (or score), and the COCO-17 skeleton,
in a colour per track id. One place for the skeleton, colours and labels."""

from __future__ import annotations

import cv2
import numpy as np

# Limbs between COCO-17 keypoints (indices in COCO order: nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles; left before right).
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
# Keypoints (and limbs between them) below this score are not drawn.
KEYPOINT_MIN_SCORE = 0.3


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
