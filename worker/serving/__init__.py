"""The model half: a model folder and a request in, an answer out (registry, metadata, processors, batching, engine)."""
