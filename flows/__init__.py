"""Prefect wiring for loraops, installed as the subpackage ``loraops.flows``: flows call library code and decide nothing.

- ``finetune``: prepare → train → evaluate (DVC stages), one MLflow run, registration, the gate;
- ``promote`` / ``rollback``: move ``production`` only through the gate (audited);
- ``reproduce``: rebuild a registered run from its lineage card and compare;
- ``deploy``: serve the four as deployments named ``loraops`` (``loraops deploy``).
"""
