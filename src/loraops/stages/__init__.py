"""Layer 2: the DVC stages (prepare, augment, index, train, evaluate) and what sets up or previews their data. Each
stage module has ``run(params, root)``; ``loraops <stage>`` calls it."""
