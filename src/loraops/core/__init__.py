"""Layer 0: what every other layer stands on: params and their validation, errors, the path catalogue, secrets,
file helpers, input readers and text templates, typed results, the Korean analyser, locks and slots."""
