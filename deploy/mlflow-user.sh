#!/bin/sh
# Create the MLflow user the workers sign in as (README "Many machines"), once, as the admin
# user of the tracking server at $MLFLOW_TRACKING_URI, through MLflow's REST API (plain
# Python: MLflow's own auth client would need Flask-WTF on this machine too). Passwords come
# from the environment, not the command line: MLFLOW_AUTH_ADMIN_PASSWORD (the admin's),
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the user to create: the variables the
# workers then use).
set -eu
: "${MLFLOW_TRACKING_URI:?}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?}"
: "${MLFLOW_TRACKING_USERNAME:?}" "${MLFLOW_TRACKING_PASSWORD:?}"
exec python3 - <<'PY'
import base64, json, os, urllib.error, urllib.request

env = os.environ
admin = base64.b64encode(f"admin:{env['MLFLOW_AUTH_ADMIN_PASSWORD']}".encode()).decode()
body = {"username": env["MLFLOW_TRACKING_USERNAME"], "password": env["MLFLOW_TRACKING_PASSWORD"]}
req = urllib.request.Request(
    env["MLFLOW_TRACKING_URI"].rstrip("/") + "/api/2.0/mlflow/users/create",
    data=json.dumps(body).encode(), method="POST",
    headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"})
try:
    urllib.request.urlopen(req, timeout=60).close()
    print(f"MLflow user {body['username']} created")
except urllib.error.HTTPError as exc:  # run again (a container restarted): the user is there
    if exc.code != 400 or b"RESOURCE_ALREADY_EXISTS" not in exc.read():
        raise
    print(f"MLflow user {body['username']} exists already (its password is not changed)")
PY
