"""The e2e tier's real node: host preparation (host.py), the node's processes (cluster.py)
and the images built here (images.py, build-images.sh)."""
