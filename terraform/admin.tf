# The admin port (server.admin_port, 9090): /metrics, /v1/providers, /openapi.json and the admin
# API. Never behind the ALB (its target group and listener rules name 8080 only); the collector
# beside the proxy reaches it over the task's loopback, and a collector elsewhere in the VPC only
# from the security groups listed here. The admin API's token comes from Secrets Manager.

variable "metrics_collector_security_group_ids" {
  description = "Security groups of metrics collectors outside the task allowed to reach the admin port (9090); the collector inside the task needs none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.metrics_collector_security_group_ids : can(regex("^sg-[0-9a-f]+$", id))])
    error_message = "metrics_collector_security_group_ids: each must be a security group id (sg-...)."
  }
}

resource "aws_vpc_security_group_ingress_rule" "service_admin_from_collectors" {
  for_each = toset(var.metrics_collector_security_group_ids)

  security_group_id            = aws_security_group.service.id
  description                  = "Admin port (metrics) from a metrics collector"
  ip_protocol                  = "tcp"
  from_port                    = 9090
  to_port                      = 9090
  referenced_security_group_id = each.value
}

resource "random_password" "admin_token" {
  # Letters and digits: it travels in an Authorization header, never escaped.
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret" "admin_token" {
  #checkov:skip=CKV2_AWS_57:rotated with terraform apply -replace=random_password.admin_token, then a new deployment (see README)
  name_prefix             = "${var.name}/admin-token-"
  description             = "payagg admin API token (PAYAGG_ADMIN_TOKEN)"
  kms_key_id              = aws_kms_key.payagg.arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "admin_token" {
  secret_id     = aws_secretsmanager_secret.admin_token.id
  secret_string = jsonencode({ token = random_password.admin_token.result })
}
