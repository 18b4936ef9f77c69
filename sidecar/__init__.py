"""The offloading sidecar: a reverse proxy in front of the model container."""
