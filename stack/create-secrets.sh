#!/bin/sh
# Create the Swarm secrets stack/cellmesh.yml expects, with fresh random
# passwords, on a Swarm manager. Run once, before the first deploy.
#
#   sh stack/create-secrets.sh
#
# The passwords appear in two secrets each (the server's and the client URL),
# so they are made together here and never printed. For object storage other
# than the stack's LocalStack, set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY
# in the environment first; LocalStack accepts any key (an alphanumeric access
# key id puts everything in its default account) and does not check the
# secret.
#
# The mesh's certificates and tokens come from a folder made beforehand with
#
#   python -m services.common.pki mesh --out DIR [--host catalog.lab.example.org ...]
#
# (a CA, a certificate per service and user role, a token per user role):
# set CELLMESH_PKI_DIR=DIR. Keep DIR's ca.key offline afterwards.
#
# Refuses to run if any of the secrets already exists: replacing only some of
# them would leave a server and its clients with different passwords. See
# docs/operations.md, "Rotating a password".
set -eu

docker=${DOCKER:-docker}

secrets="cellmesh_mariadb_root_password cellmesh_mariadb_password
cellmesh_database_url cellmesh_rabbitmq_credentials cellmesh_amqp_url
cellmesh_s3_access_key_id cellmesh_s3_secret_access_key
cellmesh_tls_ca cellmesh_auth_tokens
cellmesh_tls_catalog_cert cellmesh_tls_catalog_key
cellmesh_tls_scheduler_cert cellmesh_tls_scheduler_key
cellmesh_tls_cpworker_cert cellmesh_tls_cpworker_key
cellmesh_tls_reducer_cert cellmesh_tls_reducer_key
cellmesh_tls_autoscaler_cert cellmesh_tls_autoscaler_key
cellmesh_tls_web_cert cellmesh_tls_web_key"

pki=${CELLMESH_PKI_DIR:-}
if [ -z "$pki" ] || [ ! -f "$pki/ca.pem" ] || [ ! -f "$pki/tokens" ]; then
    echo "create-secrets: set CELLMESH_PKI_DIR to a folder made by" >&2
    echo "  python -m services.common.pki mesh --out DIR" >&2
    exit 1
fi

existing=""
for name in $secrets; do
    if $docker secret inspect "$name" >/dev/null 2>&1; then
        existing="$existing $name"
    fi
done
if [ -n "$existing" ]; then
    echo "create-secrets: these secrets exist already:$existing" >&2
    echo "create-secrets: nothing created" >&2
    exit 1
fi

# 48 hex characters: safe inside URLs and rabbitmq.conf without escaping.
random_hex() {
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

create() {
    # $1 name; the value comes on standard input and never touches the disk.
    $docker secret create --label org.cellmesh.stack=cellmesh "$1" - >/dev/null
    echo "created $1"
}

root_pw=$(random_hex)
db_pw=$(random_hex)
mq_pw=$(random_hex)
s3_key=${S3_ACCESS_KEY_ID:-cellmesh}
s3_secret=${S3_SECRET_ACCESS_KEY:-$(random_hex)}

printf '%s' "$root_pw" | create cellmesh_mariadb_root_password
printf '%s' "$db_pw" | create cellmesh_mariadb_password
printf '%s' "mysql+asyncmy://cellmesh:$db_pw@mariadb:3306/cellmesh" | create cellmesh_database_url
printf 'default_user = cellmesh\ndefault_pass = %s\n' "$mq_pw" | create cellmesh_rabbitmq_credentials
printf '%s' "amqp://cellmesh:$mq_pw@rabbitmq:5672/%2F" | create cellmesh_amqp_url
printf '%s' "$s3_key" | create cellmesh_s3_access_key_id
printf '%s' "$s3_secret" | create cellmesh_s3_secret_access_key
create cellmesh_tls_ca < "$pki/ca.pem"
create cellmesh_auth_tokens < "$pki/tokens"
for role in catalog scheduler cpworker reducer autoscaler web; do
    create "cellmesh_tls_${role}_cert" < "$pki/$role.pem"
    create "cellmesh_tls_${role}_key" < "$pki/$role.key"
done
