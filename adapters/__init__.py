"""Engine adapters, one module per engine; each imports its engine only inside load()."""
