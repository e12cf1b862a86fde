"""Deployment artifacts generated from the code's own declarations: Strimzi topics and users
from the topic specs and access grants, the Grafana dashboard from the exported metrics.
`relata deploy-manifests` writes them under deploy/."""
