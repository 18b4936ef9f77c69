"""The ModelDeployment API (deployment.beamlit.com/v1alpha1) and what both products compute from it.

`modeldeployment.yaml` is the CustomResourceDefinition; `model` is the same definition as
typed Python data, with the same defaults; `validation` holds the rules the schema cannot
express. Next to them, the pure pieces the webhook and the sidecar share: the HPA's
arithmetic (`hpa`), the offloading decision (`decision`) and its published form (`status`),
the sidecar's RBAC rules (`rbac`) and the one retry-delay policy (`backoff`). Nothing here
does I/O, so both products import it at no cost; neither is imported here
(tests/unit/test_layers.py).
"""
