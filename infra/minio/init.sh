#!/bin/sh
# One-shot set-up of the object store (compose service `minio-init`), safe to rerun:
#   buckets  mlflow-artifacts (MLflow's proxied artefacts) and brainlm-dvc (the DVC remote);
#   users    one per client, each allowed only its own bucket (policies in this folder).
# The root credentials stay in this container and the MinIO server; clients get their own keys.
set -eu
for name in MINIO_ROOT_USER MINIO_ROOT_PASSWORD MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY \
            DVC_S3_ACCESS_KEY DVC_S3_SECRET_KEY; do
  eval "value=\${$name:-}"
  [ -n "$value" ] || { echo "minio-init: $name is empty: set it in infra/.env" >&2; exit 1; }
done
# root credentials through the environment, not argv (visible in `ps`). The clients' secret
# keys do go on `mc admin user add`'s command line (it has no other non-interactive form), for
# the seconds this one-shot container lives, in its own process namespace.
export MC_HOST_store="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${MINIO_HOST:-minio:9000}"
mc mb --ignore-existing store/mlflow-artifacts store/brainlm-dvc
mc admin policy create store brainlm-mlflow /init/policy-mlflow.json
mc admin policy create store brainlm-dvc /init/policy-dvc.json
mc admin user add store "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
mc admin user add store "$DVC_S3_ACCESS_KEY" "$DVC_S3_SECRET_KEY"
# attaching a policy that is already attached is an error in mc: ignore exactly that case
mc admin policy attach store brainlm-mlflow --user "$MLFLOW_S3_ACCESS_KEY" 2>/dev/null || \
  mc admin policy entities store --user "$MLFLOW_S3_ACCESS_KEY" | grep -q brainlm-mlflow
mc admin policy attach store brainlm-dvc --user "$DVC_S3_ACCESS_KEY" 2>/dev/null || \
  mc admin policy entities store --user "$DVC_S3_ACCESS_KEY" | grep -q brainlm-dvc
echo "minio-init: buckets and users ready"
