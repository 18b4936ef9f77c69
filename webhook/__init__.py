"""The admission webhooks: ModelDeployment validation and sidecar injection."""
