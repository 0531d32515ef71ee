"""posemesh: video in, pose tracks and annotated video out.

The client distribution (clients/python): the generated API in `posemesh.v1`, the SDK in
`posemesh.client`, the CLI in `posemesh.cli`. It needs grpcio, protobuf and tqdm, nothing of the server.
The server distribution, `posemesh-server` (the repository's top-level pyproject.toml), adds
`posemesh.gateway`, `posemesh.stages`, `posemesh.mesh` (what they share) and `posemesh.devstack` (the local
stack for development and tests) to this package.
"""

__version__ = "0.1.0"
