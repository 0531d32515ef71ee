"""The gateway's Prometheus metrics (served on POSEMESH_GATEWAY_METRICS_PORT when set)."""

from prometheus_client import Counter

UPLOADS = Counter("posemesh_gateway_uploads_total", "Uploads by outcome (accepted or the gRPC status code)",
                  ["outcome"])
UPLOAD_BYTES = Counter("posemesh_gateway_upload_bytes_total", "Bytes of accepted uploads")
TASKS_ENDED = Counter("posemesh_gateway_tasks_ended_total", "Tasks that reached a terminal state", ["state"])
TOPICS_DELETED = Counter("posemesh_gateway_task_topics_deleted_total", "Tasks whose topics were deleted")
