#!/usr/bin/env bash
# The MLflow UI and tracking server (what `mlflow ui` does), at http://127.0.0.1:5000.
# One script for a workstation and for the team stack (infra/compose.yaml runs it too).
#
# Workstation: every stage, worker and test writes to the project's store
#   sqlite:///<repo>/mlflow/mlflow.db, artefacts in mlflow/artifacts/.
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI   runs/models database (e.g. postgresql://mlflow:PW@db/mlflow);
#                              MLFLOW_TRACKING_URI is accepted for it when it is not http(s)
#   MLFLOW_ARTIFACTS           where proxied artefacts go (a folder, or s3://bucket/prefix with
#                              MLFLOW_S3_ENDPOINT_URL and AWS_* for MinIO)
#   MLFLOW_HOST, MLFLOW_PORT   listen address (default 127.0.0.1:5000)
#   MLFLOW_AUTH=1              basic auth (mlflow/basic_auth.ini). The admin password comes
#                              from MLFLOW_AUTH_ADMIN_PASSWORD and there is no default: the
#                              server refuses to start without one.
#   MLFLOW_AUTH_DATABASE_URI   users/permissions database (default sqlite mlflow/basic_auth.db)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF signing key (drawn at start when unset)
# Clients see artefacts only through the server (--serve-artifacts): they need no S3 keys.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export MLFLOW_DISABLE_TELEMETRY=true
backend=${MLFLOW_BACKEND_STORE_URI:-}
if [ -z "$backend" ]; then
  case "${MLFLOW_TRACKING_URI:-}" in
    ""|http://*|https://*) backend="sqlite:///$here/mlflow.db" ;;
    *) backend=$MLFLOW_TRACKING_URI ;;
  esac
fi
# the store URL may hold a password: pass it in the environment (mlflow reads it there), not
# on the command line that `ps` shows to every user of the host
export MLFLOW_BACKEND_STORE_URI=$backend
export MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS:-$here/artifacts}
args=(--serve-artifacts --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}")
if [ -n "${MLFLOW_AUTH:-}" ] && [ "${MLFLOW_AUTH}" != "0" ]; then
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
    echo "MLFLOW_AUTH is set but MLFLOW_AUTH_ADMIN_PASSWORD is empty: refusing to start" >&2
    exit 2
  fi
  # CSRF tokens are signed with this key; replicas behind one address must share it (compose
  # sets it), a lone server may draw its own
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  config=${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}
  if [ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]; then
    # the users database URL holds a password: write it to a private copy, never to the repo
    umask 077
    private=$(mktemp -d)
    trap 'rm -rf "$private"' EXIT
    python3 - "$config" "$private/basic_auth.ini" <<'PY'
import configparser, os, sys
ini = configparser.ConfigParser(interpolation=None)
ini.read(sys.argv[1])
ini["mlflow"]["database_uri"] = os.environ["MLFLOW_AUTH_DATABASE_URI"]
with open(sys.argv[2], "w") as fh:
    ini.write(fh)
PY
    config=$private/basic_auth.ini
  fi
  export MLFLOW_AUTH_CONFIG_PATH=$config
  args+=(--app-name basic-auth)
fi
# not exec: the EXIT trap removes the private config when the server stops
# `make demo` prints `./mlflow/server.sh` for a shell without the venv activated
mlflow_bin=$(command -v mlflow || true)
[ -n "$mlflow_bin" ] || mlflow_bin="$here/../.venv/bin/mlflow"
[ -x "$mlflow_bin" ] || { echo "mlflow is not installed: run 'make install' or activate the venv" >&2; exit 1; }
# MLflow 3's UI opens experiments in its GenAI mode; this link opens the runs (the "Model
# training" switch at the top left does the same and the browser remembers it)
echo "MLflow UI: http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}/#/experiments?workflowType=machine_learning" >&2
"$mlflow_bin" server "${args[@]}" "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -rf "${private:-}"' TERM INT
wait "$server"
