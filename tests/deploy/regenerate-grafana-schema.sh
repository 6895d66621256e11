#!/usr/bin/env bash
# Regenerates tests/deploy/grafana-dashboard.schema.json (committed; CI does not need npm).
# The schema is derived from Grafana's own TypeScript types of the dashboard model
# (@grafana/schema, Apache-2.0) with ts-json-schema-generator; --additional-properties keeps it
# open to panel-plugin fields, as Grafana itself is.
set -euo pipefail
SCHEMA_VERSION="${1:-13.2.3}"
out="$(cd "$(dirname "$0")" && pwd)/grafana-dashboard.schema.json"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund "@grafana/schema@${SCHEMA_VERSION}" ts-json-schema-generator@2.4.0 >/dev/null
npx ts-json-schema-generator \
  --path node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts \
  --type Dashboard --additional-properties --no-type-check -o "$out"
echo "wrote $out (@grafana/schema ${SCHEMA_VERSION})"
