"""Layer 1: how answers are judged: metrics and their measured validity on Korean, degenerate output, speech level,
the gate's decision, the evaluation report. Imports only from core."""
