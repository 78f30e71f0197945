"""Layer 4: a registered version at work: the pyfunc model, the OpenAI-compatible server, the demo, exports."""
