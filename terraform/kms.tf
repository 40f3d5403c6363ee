# One customer-managed key for everything payagg stores at rest: the store's secret, the store
# itself, the container and flow-log groups. A single key keeps the cost at $1/month and one place
# to audit.

data "aws_iam_policy_document" "kms" {
  # Key policies always name the key itself as "*"; the account-root statement is what lets IAM
  # policies (the execution role's kms:Decrypt) grant access at all.
  #checkov:skip=CKV_AWS_109:a key policy's "*" resource is the key itself; IAM policies narrow access
  #checkov:skip=CKV_AWS_111:a key policy's "*" resource is the key itself; IAM policies narrow access
  #checkov:skip=CKV_AWS_356:a key policy's "*" resource is the key itself; IAM policies narrow access
  statement {
    sid       = "AccountAdministersTheKey"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogsEncryptsPayaggLogGroups"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${data.aws_region.current.name}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:log-group:*"]
    }
  }
}

resource "aws_kms_key" "payagg" {
  description             = "${var.name}: store secret, store at rest, log groups"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "payagg" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.payagg.key_id
}
