"""Offline evaluation: held-out MLM, cloze and classification probes from the built-in corpus, and
a GLUE fine-tuning runner (gate.run is what `python -m roberta_ds.evaluate` calls)."""
