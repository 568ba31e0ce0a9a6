# The engine nodes' instance role: read, write and delete objects under the lake prefix,
# list the bucket only under that prefix, and use the bucket's KMS key. Nothing else.
#
# Two details the engine needs (src/lake/s3.rs):
# - ListBucket's prefix condition is "IfExists": S3 authorizes HeadBucket (the engine's check
#   at start) and the 404-or-403 answer to a GET of a missing key (the engine reads "no such
#   key" as "not written yet") against s3:ListBucket with no s3:prefix in the request; a
#   plain StringLike would turn both into AccessDenied. Every listing that names a prefix
#   must still be under the lake prefix.
# - AbortMultipartUpload on the lake's objects: a failed multipart upload (objects of
#   lake.s3_multipart_threshold bytes or more) is aborted so its parts stop being billed.

resource "aws_iam_role" "engine" {
  name        = "${var.name_prefix}-engine"
  description = "fmsflow engine nodes: the lake prefix of ${var.lake_bucket_name} only"

  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect    = "Allow"
        Principal = { Service = "ec2.amazonaws.com" }
        Action    = "sts:AssumeRole"
      },
    ]
  })
}

resource "aws_iam_role_policy" "engine_lake" {
  name = "lake-prefix-only"
  role = aws_iam_role.engine.id

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ListTheLakePrefixOnly"
        Effect   = "Allow"
        Action   = "s3:ListBucket"
        Resource = aws_s3_bucket.lake.arn
        Condition = {
          StringLikeIfExists = { "s3:prefix" = ["${var.lake_prefix}*"] }
        }
      },
      {
        Sid    = "ReadWriteDeleteLakeObjects"
        Effect = "Allow"
        Action = [
          "s3:GetObject",
          "s3:PutObject",
          "s3:DeleteObject",
          "s3:AbortMultipartUpload",
        ]
        Resource = "${aws_s3_bucket.lake.arn}/${var.lake_prefix}*"
      },
      {
        Sid    = "UseTheLakeKey"
        Effect = "Allow"
        Action = [
          "kms:Encrypt",
          "kms:Decrypt",
          "kms:GenerateDataKey",
        ]
        Resource = aws_kms_key.lake.arn
      },
    ]
  })
}

resource "aws_iam_instance_profile" "engine" {
  name = "${var.name_prefix}-engine"
  role = aws_iam_role.engine.name
}
