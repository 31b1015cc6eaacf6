"""The offline demo: its corpus, the TopK trainer, and the steps that build a catalogue."""
