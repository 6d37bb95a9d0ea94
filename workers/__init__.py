"""Celery workers: one process per GPU with one model resident, running chunks of items through
a stage and writing outputs to storage. Stages (workers/stages/) never touch Celery, Redis or boto3."""
