"""Prefect flows and the ``gptpipe`` command line. Thin: the work itself lives in ``gptpipe``."""

import os

# Offline machines: no telemetry, no update checks. Users can still override any of these.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
