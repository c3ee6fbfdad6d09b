#!/usr/bin/env bash
# The MLflow UI and tracking server on the project's store (what `mlflow ui` does), at
# http://127.0.0.1:5000. Every stage, worker and test run writes to the same store:
#   sqlite:///<repo>/mlflow/mlflow.db   (override with MLFLOW_TRACKING_URI / --backend-store-uri)
# Shared servers: MLFLOW_AUTH=1 turns on basic auth (mlflow/basic_auth.ini); the admin password
# comes from MLFLOW_AUTH_ADMIN_PASSWORD and there is no default: the server refuses to start
# without one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export MLFLOW_DISABLE_TELEMETRY=true
backend=${MLFLOW_TRACKING_URI:-sqlite:///$here/mlflow.db}
args=(--backend-store-uri "$backend" --artifacts-destination "${MLFLOW_ARTIFACTS:-$here/artifacts}"
      --serve-artifacts --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}")
if [ -n "${MLFLOW_AUTH:-}" ]; then
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
    echo "MLFLOW_AUTH is set but MLFLOW_AUTH_ADMIN_PASSWORD is empty: refusing to start" >&2
    exit 2
  fi
  export MLFLOW_AUTH_CONFIG_PATH=${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}
  args+=(--app-name basic-auth)
fi
exec mlflow server "${args[@]}" "$@"
