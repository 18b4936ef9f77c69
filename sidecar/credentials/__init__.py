"""Credentials the sidecar adds to requests sent to the remote: OAuth2 client-credentials
tokens and header values read from Secrets, each refreshed in the background."""
