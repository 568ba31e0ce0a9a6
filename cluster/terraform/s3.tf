# The Parquet lake: s3://<lake_bucket_name>/<lake_prefix>. Private, KMS-encrypted, versioned,
# TLS only; lake objects move to cheaper storage classes as they age.

resource "aws_kms_key" "lake" {
  description             = "${var.name_prefix}: the lake bucket ${var.lake_bucket_name}"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  # The account administers the key; the engine role's IAM policy (iam.tf) grants its use.
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      local.kms_account_admin,
    ]
  })

  tags = {
    Name = "${var.name_prefix}-lake"
  }
}

resource "aws_kms_alias" "lake" {
  name          = "alias/${var.name_prefix}-lake"
  target_key_id = aws_kms_key.lake.key_id
}

resource "aws_s3_bucket" "lake" {
  # checkov:skip=CKV_AWS_18: server access logs need a second bucket (itself flagged for logging); only the engine role can touch the lake, and an account CloudTrail with S3 data events is where object access is audited
  # checkov:skip=CKV2_AWS_62: nothing consumes bucket events: the engine and its readers find lake files through the lake's own manifests and listings
  # checkov:skip=CKV_AWS_144: cross-region replication doubles the storage and transfer cost of derived data; versioning with noncurrent retention already protects against overwrites and deletes
  bucket = var.lake_bucket_name

  tags = {
    Name = var.lake_bucket_name
  }
}

resource "aws_s3_bucket_ownership_controls" "lake" {
  bucket = aws_s3_bucket.lake.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "lake" {
  bucket = aws_s3_bucket.lake.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "lake" {
  bucket = aws_s3_bucket.lake.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.lake.arn
    }
    # One data key per bucket instead of per object: far fewer KMS requests for many small files.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "lake" {
  bucket = aws_s3_bucket.lake.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "lake" {
  bucket = aws_s3_bucket.lake.id

  rule {
    id     = "lake-storage-classes"
    status = "Enabled"

    filter {
      prefix = var.lake_prefix
    }

    transition {
      days          = var.lake_ia_after_days
      storage_class = "STANDARD_IA"
    }

    transition {
      days          = var.lake_glacier_ir_after_days
      storage_class = "GLACIER_IR"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.lake_noncurrent_expire_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  rule {
    id     = "whole-bucket-housekeeping"
    status = "Enabled"

    filter {}

    expiration {
      expired_object_delete_marker = true
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  # Lifecycle rules on a versioned bucket must come after versioning is on.
  depends_on = [aws_s3_bucket_versioning.lake]

  lifecycle {
    precondition {
      condition     = var.lake_glacier_ir_after_days >= var.lake_ia_after_days + 30
      error_message = "lake_glacier_ir_after_days must be at least lake_ia_after_days + 30: S3 keeps an object in STANDARD_IA 30 days before a further transition."
    }
  }
}

resource "aws_s3_bucket_policy" "lake" {
  bucket = aws_s3_bucket.lake.id

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource = [
          aws_s3_bucket.lake.arn,
          "${aws_s3_bucket.lake.arn}/*",
        ]
        Condition = {
          Bool = { "aws:SecureTransport" = "false" }
        }
      },
    ]
  })

  # Put the policy on only once public policies are blocked.
  depends_on = [aws_s3_bucket_public_access_block.lake]
}
