"""Cluster mode's sources: the Kubernetes API (credentials, a small async client, the
informer loop) and the sidecar's own ModelDeployment watched through it."""
