# The providers' credentials and the callback secrets, generated here and kept in one Secrets
# Manager secret. ECS hands the same keys to the proxy (the variables config/gateway.yaml reads) and
# to the mocks beside it (their MOCK_* credentials), so every task exercises real token checks and
# signed callbacks: a mock given credentials refuses any other. Against the real MTN and Airtel
# APIs the credentials are the ones the providers issue, not generated ones (README, Secrets).

resource "random_uuid" "mtn_api_user" {} # MTN's API user is a UUID (v4)

resource "random_uuid" "airtel_client_id" {}

# Alphanumeric only: each value is substituted into the YAML config as text and sent in HTTP Basic
# (MTN) or a form body (Airtel), where ':' '#' or quotes would need escaping.
resource "random_password" "provider" {
  for_each = toset(["mtn_api_key", "mtn_subscription_key", "airtel_client_secret"])

  length  = 32
  special = false
}

resource "random_password" "callback" {
  # payagg's server.callback_secret (the callback URLs' tokens) and Airtel's callback HMAC key.
  for_each = toset(["payagg", "airtel"])

  length  = 64
  special = false
}

resource "aws_secretsmanager_secret" "providers" {
  #checkov:skip=CKV2_AWS_57:the credentials are shared by the proxy and the mocks of every task; rotate them together with terraform apply -replace (see README), which no Lambda could do for a provider
  name_prefix             = "${var.name}/providers-"
  description             = "payagg provider credentials (MTN, Airtel) and callback secrets"
  kms_key_id              = aws_kms_key.payagg.arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "providers" {
  secret_id = aws_secretsmanager_secret.providers.id
  secret_string = jsonencode({
    mtn_api_user           = random_uuid.mtn_api_user.result
    mtn_api_key            = random_password.provider["mtn_api_key"].result
    mtn_subscription_key   = random_password.provider["mtn_subscription_key"].result
    airtel_client_id       = random_uuid.airtel_client_id.result
    airtel_client_secret   = random_password.provider["airtel_client_secret"].result
    callback_secret        = random_password.callback["payagg"].result
    airtel_callback_secret = random_password.callback["airtel"].result
  })
}

# The execution role resolves the secret when a task starts (iam.tf grants kms:Decrypt on the key).
data "aws_iam_policy_document" "execution_provider_secrets" {
  statement {
    sid       = "ReadTheProviderSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.providers.arn]
  }
}

resource "aws_iam_role_policy" "execution_provider_secrets" {
  name   = "read-provider-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_provider_secrets.json
}
