"""The compression engine: models, presets, calibration, preflight, oneshot, evaluation, model card.

Pure Python: nothing here imports Django, so the engine runs from its own command line
(`python -m engine`) and from the Celery workers alike.
"""
