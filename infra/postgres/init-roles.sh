#!/bin/sh
# One login role and one database per service, each role owning only its own database:
#   mlflow  -> mlflow (tracking store) and mlflow_auth (basic-auth users)
#   optuna  -> optuna (studies)
#   prefect -> prefect (orchestration)
# No role is a superuser or may create roles or databases, and PUBLIC may not connect, so a
# leaked MLflow password does not open the Prefect or Optuna data.
# Runs once, on an empty data directory, from the postgres image's /docker-entrypoint-initdb.d;
# the tests run the same file against a throwaway cluster (PGHOST/PGPORT point psql there).
# Passwords come from the environment (\getenv), never from argv or this file.
set -eu
for name in MLFLOW_DB_PASSWORD OPTUNA_DB_PASSWORD PREFECT_DB_PASSWORD; do
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    echo "init-roles: $name is empty: set it in infra/.env" >&2
    exit 1
  fi
done

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" \
     --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv optuna_password OPTUNA_DB_PASSWORD
\getenv prefect_password PREFECT_DB_PASSWORD
SET password_encryption = 'scram-sha-256';

CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'mlflow_password';
CREATE ROLE optuna LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'optuna_password';
CREATE ROLE prefect LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'prefect_password';

CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna, prefect FROM PUBLIC;
-- the bootstrap and template databases are the superuser's alone
REVOKE CONNECT ON DATABASE postgres, template1 FROM PUBLIC;

-- Prefect's migrations ask for pg_trgm (trusted, but created here so its role needs no more)
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
echo "init-roles: roles mlflow, optuna, prefect and their databases are ready"
