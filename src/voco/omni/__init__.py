"""Omni-supervised pre-training (SPEC 3, 5): VoComni curation, stage 1 / stage 2, pseudo-labelling, SuPreM.

* :mod:`voco.omni.curation` — the 21-class VoComni map, mapping of partial source labels into it, ensemble fusion,
  label completion, per-volume scoring and the ``voco vocomni`` curation run.
* :mod:`voco.omni.stage` — labelled-crop sampling (pos:neg), the DiceCE loss (with partial-label marginalisation),
  and the stage 1 / stage 2 training steps on top of the shared loop.
* :mod:`voco.omni.pseudolabel` — sliding-window pseudo-labels and their per-volume confidence.
* :mod:`voco.omni.suprem` — supervised-only pre-training (method ``suprem``).
"""
