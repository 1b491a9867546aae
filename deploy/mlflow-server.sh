#!/bin/sh
# The MLflow tracking server of the many-machine recipe (README "Many machines"), as the
# database host runs it: runs and the model registry in PostgreSQL (password from ~/.pgpass or
# $PGPASSFILE, never in the URL), model files under $MLFLOW_DIR/artifacts served to the workers
# through the server (they need no shared disk), users checked by MLflow's basic
# authentication (deploy/basic_auth.ini; the users' own database in $MLFLOW_DIR).
#
# Variables: MLFLOW_FLASK_SERVER_SECRET_KEY (required: signs the sign-up form; the same on
# every server process), MLFLOW_AUTH_ADMIN_PASSWORD (required at the first start only),
# MLFLOW_DIR (/srv/mlflow), DB_HOST (localhost), MLFLOW_BIND (0.0.0.0), MLFLOW_PORT (5000),
# MLFLOW_ALLOWED_HOSTS (MLflow's default: localhost and private addresses; set it to
# "NAME:PORT,NAME" when workers reach the server by a public name), MLFLOW_SERVER_WORKERS
# (MLflow's default: 4 server processes).
#
# uvloop (the `server` extra) as uvicorn's event loop. uvicorn picks it by itself when it is
# installed; the flag makes a host without it fail at start rather than serve slowly. On
# asyncio's loop, uvicorn 0.54's several processes share a listening socket that leaves
# Nagle's algorithm on for every connection (uvicorn issue #3149), and each request on a
# kept-alive connection waits ~40 ms for the client's delayed ACK: log_metric and log_params
# took ~60 ms instead of ~20 ms here (make bench-scale at N = 1, before and after).
set -eu
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it to a long random string}"
MLFLOW_DIR=${MLFLOW_DIR:-/srv/mlflow}
DB_HOST=${DB_HOST:-localhost}
here=$(cd "$(dirname "$0")" && pwd)
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}"
mkdir -p "$MLFLOW_DIR/artifacts"
chmod 700 "$MLFLOW_DIR"  # the users' database and the model files are the server's alone
cd "$MLFLOW_DIR"
exec mlflow server --app-name basic-auth \
    --backend-store-uri "postgresql://mnist_opt@$DB_HOST/mlflow" \
    --artifacts-destination "$MLFLOW_DIR/artifacts" \
    --host "${MLFLOW_BIND:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
    --uvicorn-opts "--loop uvloop" \
    ${MLFLOW_SERVER_WORKERS:+--workers "$MLFLOW_SERVER_WORKERS"} \
    ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"}
