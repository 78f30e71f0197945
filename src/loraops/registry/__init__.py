"""Layer 3: MLflow: tracking a run, the lineage card, registering and promoting versions (the gate, the lock, the
audit), reproducing a run from its card."""
