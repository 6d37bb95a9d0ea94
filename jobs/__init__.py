"""The producer: the `imgjobs` CLI, job validation, planning and enqueueing, and status.
It never imports torch or workers/: tasks are sent by name and workers are started as processes."""
