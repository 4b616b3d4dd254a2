"""Step caches: skip the DiT's blocks on denoising steps whose result can be predicted.

``base.StepCache`` is the interface the DiT forward asks; ``teacache`` and ``magcache``
implement it; ``calibration`` holds their per-model calibrations (pure Python).
"""
