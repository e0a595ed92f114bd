"""The yardstick of issue #17: the stack a Python team would pick instead
of md5-light (Flask under gunicorn, Celery, Redis, requests into hashlib).
It is not part of the service; the benchmarks start it, measure it in the
same run as md5-light, and stop it. See ``stack.Yardstick``."""
