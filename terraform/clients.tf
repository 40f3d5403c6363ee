# The payment API's clients (README, "Security"). The deployment runs `auth: required`: every
# POST /v1/pay and GET /v1/payments/... needs a client's API key. Terraform never sees a key, only
# its SHA-256; the hashes live in one Secrets Manager secret that ECS hands the proxy as
# PAYAGG_MERCHANT_KEY_SHA256 when a task starts (the shipped gateway.yaml's `merchant` client).
# Rotation: add the new key's hash beside the old one, deploy, move the merchant to the new key,
# then remove the old hash and deploy again.

resource "aws_secretsmanager_secret" "client_keys" {
  #checkov:skip=CKV2_AWS_57:holds key hashes, not keys; a key is rotated by the merchant and the operator together (two hashes, then one: README, Security), which no Lambda can do
  name_prefix             = "${var.name}/client-keys-"
  description             = "SHA-256 hashes of the payment API's client keys (never the keys)"
  kms_key_id              = aws_kms_key.payagg.arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "client_keys" {
  secret_id = aws_secretsmanager_secret.client_keys.id
  # Comma-separated: the config reads one entry as one or more hashes.
  secret_string = jsonencode({ merchant = join(",", var.merchant_key_sha256) })
}
