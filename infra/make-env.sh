#!/bin/sh
# Write infra/.env (or $1) from .env.example with a fresh random value for every empty secret
# (names with PASSWORD, SECRET or AUTH_STRING), this checkout as BRAINLM_WORKSPACE and its
# owner as BRAINLM_UID/BRAINLM_GID. Never overwrites: the databases keep the
# passwords of their first start, so rotating means changing them in the services too.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/.env}
if [ -e "$out" ]; then
  echo "$out exists: not overwriting it" >&2
  exit 1
fi
umask 077
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
python3 - "$here/.env.example" "$(dirname "$here")" >"$tmp" <<'PY'
import os
import re
import secrets
import sys

owner = os.stat(sys.argv[2])
for line in open(sys.argv[1]):
    line = line.rstrip("\n")
    name = re.fullmatch(r"([A-Z0-9_]+)=", line)
    if name and name.group(1) == "BRAINLM_WORKSPACE":
        line += sys.argv[2]
    elif name and name.group(1) in ("BRAINLM_UID", "BRAINLM_GID"):
        line += str(owner.st_uid if name.group(1) == "BRAINLM_UID" else owner.st_gid)
    elif name and re.search(r"PASSWORD|SECRET|AUTH_STRING", name.group(1)):
        value = secrets.token_hex(24)  # hex: safe inside the URLs built from it
        if name.group(1) == "PREFECT_AUTH_STRING":
            value = f"brainlm:{value}"
        line += value
    print(line)
PY
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out (mode 600); keep it out of git and share it like any password"
