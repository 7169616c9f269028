#!/bin/bash
# LocalStack ready hook (mounted into /etc/localstack/init/ready.d/): creates
# the cellmesh bucket each time LocalStack starts. LocalStack's free edition
# keeps nothing across restarts, so the bucket must be made again every time.
set -euo pipefail

bucket=${S3_BUCKET:?S3_BUCKET is not set}
region=${S3_REGION:-us-east-1}

if awslocal --region "$region" s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
    echo "cellmesh: bucket $bucket exists"
elif [[ $region == us-east-1 ]]; then
    awslocal --region "$region" s3api create-bucket --bucket "$bucket"
else
    awslocal --region "$region" s3api create-bucket --bucket "$bucket" \
        --create-bucket-configuration "LocationConstraint=$region"
fi
