"""The control plane's gRPC transport: thin servicers over the domain modules."""
