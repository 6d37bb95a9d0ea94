"""Stages: one file per stage kind. A stage takes a loaded pipeline and decoded inputs and returns
outputs; it never touches Celery, Redis or storage, so a tiny model is all a test needs."""
