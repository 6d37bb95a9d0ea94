"""The Celery app behind `imgjobs schedule beat` and `imgjobs schedule worker`."""

from jobs.scheduler import make_app
from schemas.settings import Settings

app = make_app(Settings.from_env())
