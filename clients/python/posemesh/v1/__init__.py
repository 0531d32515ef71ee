"""Code generated from protos/posemesh/v1 by `python -m posemesh.codegen`. Do not edit by hand."""
