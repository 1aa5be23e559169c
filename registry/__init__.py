"""Adapter registry (adapters.yaml), the model lifecycle manager, env scoping, secrets."""
