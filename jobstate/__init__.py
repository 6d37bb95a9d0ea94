"""The owner of a job's state: Redis for what is in flight (jobstate.store), the job's storage for
what is done (jobstate.parts)."""
