"""Layer 1: the model: base loading and its checks, the dtype policy, packing, the prompt format (chat templates), one
generation path, sweep trial hooks. Imports only from core."""
