#!/bin/sh
# Write infra/.env (or $1) from .env.example: a fresh random value for every empty secret
# (names with PASSWORD, SECRET or AUTH_STRING), this checkout as BRAINLM_WORKSPACE and its
# owner as BRAINLM_UID/GID (10001 when root owns it). Beside it, client.env from
# client.env.example with the same credentials, for this machine (HOST = localhost).
# Never overwrites: the databases keep the passwords of their first start, so rotating means
# changing them in the services too.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/.env}
client=$(dirname "$out")/client.env
if [ -e "$out" ]; then
  echo "$out exists: not overwriting it" >&2
  exit 1
fi
umask 077
python3 - "$here" "$(dirname "$here")" "$out" "$client" <<'PY'
import os
import re
import secrets
import sys
import tempfile

here, repo, out, client = sys.argv[1:]
owner = os.stat(repo)
ids = {"BRAINLM_UID": owner.st_uid, "BRAINLM_GID": owner.st_gid}
if owner.st_uid == 0:  # never run the worker as root; a root-owned checkout is unusual
    ids = {"BRAINLM_UID": 10001, "BRAINLM_GID": 10001}
    print(f"note: root owns {repo}: the worker runs as 10001, which needs write access",
          file=sys.stderr)


def fill(name: str) -> str:
    if name == "BRAINLM_WORKSPACE":
        return repo
    if name in ids:
        return str(ids[name])
    if re.search(r"PASSWORD|SECRET|AUTH_STRING", name):
        value = secrets.token_hex(24)  # hex: safe inside the URLs built from it
        return f"brainlm:{value}" if name == "PREFECT_AUTH_STRING" else value
    return ""


def write(path: str, lines: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".env.")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


server, values = [], {}
for line in open(os.path.join(here, ".env.example")).read().splitlines():
    m = re.fullmatch(r"([A-Z0-9_]+)=(.*)", line)
    if m:
        value = m.group(2) or fill(m.group(1))
        values[m.group(1)] = value
        line = f"{m.group(1)}={value}"
    server.append(line)
write(out, server)
print(f"wrote {out} (mode 600); keep it out of git and share it like any password")

if os.path.exists(client):
    print(f"{client} exists: left as it is")
    sys.exit(0)
v = values
port = {k: v.get(k) for k in ("MLFLOW_PORT", "POSTGRES_PORT", "PREFECT_PORT", "MINIO_PORT")}
known = {
    "MLFLOW_TRACKING_URI": f"http://localhost:{port['MLFLOW_PORT']}",
    "MLFLOW_TRACKING_USERNAME": v["BRAINLM_MLFLOW_USER"],
    "MLFLOW_TRACKING_PASSWORD": v["BRAINLM_MLFLOW_PASSWORD"],
    "BRAINLM_OPTUNA_STORAGE": f"postgresql://optuna:{v['OPTUNA_DB_PASSWORD']}@localhost:"
                              f"{port['POSTGRES_PORT']}/optuna",
    "PREFECT_API_URL": f"http://localhost:{port['PREFECT_PORT']}/api",
    "PREFECT_API_AUTH_STRING": v["PREFECT_AUTH_STRING"],
    "AWS_ACCESS_KEY_ID": v["DVC_S3_ACCESS_KEY"],
    "AWS_SECRET_ACCESS_KEY": v["DVC_S3_SECRET_KEY"],
    "AWS_ENDPOINT_URL_S3": f"http://localhost:{port['MINIO_PORT']}",
}
lines = []
for line in open(os.path.join(here, "client.env.example")).read().splitlines():
    m = re.fullmatch(r"([A-Z0-9_]+)=(.*)", line)
    if m and m.group(1) in known:
        line = f"{m.group(1)}={known[m.group(1)]}"
    lines.append(line)
write(client, lines)
print(f"wrote {client} (this machine's addresses): set -a; . {client}; set +a")
PY
