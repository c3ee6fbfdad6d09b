"""Create (or re-key) the non-admin MLflow user that pipelines and team members log as.

Run by compose's `mlflow-init` against the MLflow server with the admin's credentials:
  MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME=admin, MLFLOW_TRACKING_PASSWORD (admin's)
  BRAINLM_MLFLOW_USER, BRAINLM_MLFLOW_PASSWORD (the user to create)
With the server's default permission READ, the user can read everything, create experiments
and registered models (and manage what it created), but not administer users: the admin
password stays with whoever runs the stack.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    missing = [k for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                           "MLFLOW_TRACKING_PASSWORD", "BRAINLM_MLFLOW_USER",
                           "BRAINLM_MLFLOW_PASSWORD") if not os.environ.get(k)]
    if missing:
        print(f"add_user: set {', '.join(missing)}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    user, password = os.environ["BRAINLM_MLFLOW_USER"], os.environ["BRAINLM_MLFLOW_PASSWORD"]
    try:
        client.create_user(user, password)
        print(f"add_user: created MLflow user {user}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(user, password)  # .env is the source of truth
        print(f"add_user: MLflow user {user} exists; password set from the environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
