"""Prefect wiring for loraops: flows call the stage code in src/loraops and decide nothing themselves."""
