#!/bin/sh
# Start a Prefect worker for gptpipe's deployments (the `worker` services of docker-compose.yml; it
# works the same on a plain machine with the project installed).
#
#   PREFECT_API_URL         the Prefect server's API (required)
#   PREFECT_API_AUTH_STRING user:password where the server requires basic auth (docker-compose.yml does)
#   GPTPIPE_POOL            work pool (default gptpipe; deploy/prefect.yaml uses gptpipe)
#   GPTPIPE_WORKER_QUEUES   space-separated work queues to poll (default: all of the pool's)
#   GPTPIPE_DEPLOY=1        (re)create the deployments of deploy/prefect.yaml first
#   GPTPIPE_REPO            where this repository is (default: the current directory)
#   GPTPIPE_STORE, AWS_*    where flow runs read and write, passed on to them by the worker
set -eu

: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://prefect-server:4200/api}"
# the placeholders of .env.example are no secrets: refuse to start with them
for var in AWS_SECRET_ACCESS_KEY POSTGRES_PASSWORD PREFECT_API_AUTH_STRING; do
    eval "value=\${$var:-}"
    if [ "$value" = "change-me" ] || [ "${value#*:}" = "change-me" ]; then
        echo "error: $var is still the placeholder 'change-me' of .env.example; set a real secret in .env" >&2
        exit 2
    fi
done
pool="${GPTPIPE_POOL:-gptpipe}"
export GPTPIPE_REPO="${GPTPIPE_REPO:-$(pwd)}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

# wait for the server (it may still be migrating its database)
python - <<'PY'
import os, sys, time, urllib.request
url = os.environ["PREFECT_API_URL"].rstrip("/") + "/health"
deadline = time.time() + 180
while True:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(f"Prefect server at {url} did not answer within 180 s")
    time.sleep(2)
PY

# the pool: create it unless it exists (two workers starting together may both try: fine)
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process >/dev/null 2>&1 || true

if [ "${GPTPIPE_DEPLOY:-0}" = "1" ]; then
    (cd "$GPTPIPE_REPO" && prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml)
fi

set --
for queue in ${GPTPIPE_WORKER_QUEUES:-}; do
    set -- "$@" --work-queue "$queue"
done
exec prefect worker start --pool "$pool" --type process "$@"
