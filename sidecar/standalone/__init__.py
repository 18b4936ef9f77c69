"""Standalone mode's sources (a VM, a laptop): the ModelDeployment from a YAML file and
CPU and memory measured on the local machine."""
