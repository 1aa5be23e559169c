"""HTTP controllers: control plane, data plane, ops."""
