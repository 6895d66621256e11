#!/bin/bash
# InfluxDB 2 first-start initialisation for iotad (mounted at /docker-entrypoint-initdb.d/).
#
# The influxdb image runs this once, after DOCKER_INFLUXDB_INIT_MODE=setup has created the org, the
# bucket and the admin (operator) token from DOCKER_INFLUXDB_INIT_*. It adds what InfluxQL needs:
#  1. a DBRP mapping: database "$DOCKER_INFLUXDB_INIT_BUCKET", retention policy "autogen" -> the bucket,
#     so Grafana (and `influx v1 shell`) can query the scores with InfluxQL;
#  2. a read-only v1 user for Grafana ($INFLUX_GRAFANA_USER / $INFLUX_GRAFANA_PASSWORD).
# No secret is written here: all values come from the container environment (docker-compose.yml, .env).
set -euo pipefail

: "${DOCKER_INFLUXDB_INIT_ORG:?}" "${DOCKER_INFLUXDB_INIT_BUCKET:?}" "${DOCKER_INFLUXDB_INIT_ADMIN_TOKEN:?}"
: "${INFLUX_GRAFANA_USER:?}" "${INFLUX_GRAFANA_PASSWORD:?}"

host="${INFLUX_HOST:-http://localhost:8086}"
common=(--host "$host" --org "$DOCKER_INFLUXDB_INIT_ORG" --token "$DOCKER_INFLUXDB_INIT_ADMIN_TOKEN")

bucket_id="${DOCKER_INFLUXDB_INIT_BUCKET_ID:-}"
if [ -z "$bucket_id" ]; then
  bucket_id="$(influx bucket list "${common[@]}" --name "$DOCKER_INFLUXDB_INIT_BUCKET" --hide-headers | cut -f 1)"
fi
if [ -z "$bucket_id" ]; then
  echo "iotad init: bucket $DOCKER_INFLUXDB_INIT_BUCKET not found" >&2
  exit 1
fi

if influx v1 dbrp list "${common[@]}" --db "$DOCKER_INFLUXDB_INIT_BUCKET" --hide-headers 2>/dev/null | grep -q .; then
  echo "iotad init: DBRP mapping for $DOCKER_INFLUXDB_INIT_BUCKET exists"
else
  influx v1 dbrp create "${common[@]}" \
    --db "$DOCKER_INFLUXDB_INIT_BUCKET" --rp autogen --bucket-id "$bucket_id" --default
fi

if influx v1 auth list "${common[@]}" --username "$INFLUX_GRAFANA_USER" --hide-headers 2>/dev/null | grep -q .; then
  echo "iotad init: v1 user $INFLUX_GRAFANA_USER exists"
else
  influx v1 auth create "${common[@]}" \
    --username "$INFLUX_GRAFANA_USER" --password "$INFLUX_GRAFANA_PASSWORD" \
    --read-bucket "$bucket_id" --description "grafana (read-only, InfluxQL)"
fi
echo "iotad init: done (database $DOCKER_INFLUXDB_INIT_BUCKET -> bucket $bucket_id)"
