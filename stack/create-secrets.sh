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
# Refuses to run if any of the secrets already exists: replacing only some of
# them would leave a server and its clients with different passwords. See
# docs/operations.md, "Rotating a password".
set -eu

docker=${DOCKER:-docker}

secrets="cellmesh_mariadb_root_password cellmesh_mariadb_password
cellmesh_database_url cellmesh_rabbitmq_credentials cellmesh_amqp_url
cellmesh_s3_access_key_id cellmesh_s3_secret_access_key"

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
