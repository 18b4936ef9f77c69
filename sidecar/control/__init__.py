"""The control core, pure: what the sidecar's sources must provide and how their outputs
become a routing plan. No sockets, no files, no clock of its own."""
