"""What the gateway and the stage workers share: settings (every POSEMESH_* knob), the pipeline table,
Kafka conventions (topic names, client configs, the produce helper), media (probe and decode uploads), JPEG,
models (serving files and Triton configs) and the gRPC health probe. Nothing here serves a request."""
