# Data phase: source -> raw -> NIfTI + dataset.json -> preprocessed shards -> manifest.
