"""The local stack for development and tests: the broker (Tansu), Triton on CPU, the RTSP relay and test
cameras, process helpers, code generation. Production runs Apache Kafka, NVIDIA's Triton and MediaMTX."""
