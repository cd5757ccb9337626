"""Generated gRPC code for ``fedbone.proto`` (see README.md to regenerate)."""
