"""posemesh: video in, pose tracks and annotated video out.

This package is what a client needs (the generated API in `posemesh.v1`, the SDK in `posemesh.client`,
the CLI in `posemesh.cli`) plus the pieces the gateway and the stage workers share (`posemesh.kafka`,
`posemesh.settings`, `posemesh.models`).
"""

__version__ = "0.1.0"
