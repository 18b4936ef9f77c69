"""Certificates for the webhooks: a CA and a serving certificate signed by it."""
