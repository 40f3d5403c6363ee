# The idempotency store. The proxy fails closed when Redis is unreachable, so Redis availability is
# the gateway's availability: two nodes in two AZs with automatic failover by default.

resource "random_password" "redis_auth" {
  # Alphanumeric only: the token is embedded in the rediss:// URL, where '#', '&' or '<' would need
  # escaping, and ElastiCache forbids several other symbols. 64 characters is still ~380 bits.
  length  = 64
  special = false
}

resource "aws_elasticache_subnet_group" "redis" {
  name       = "${var.name}-redis"
  subnet_ids = module.vpc.private_subnets
}

resource "aws_elasticache_replication_group" "redis" {
  replication_group_id       = "${var.name}-redis"
  description                = "payagg idempotency store"
  engine                     = "redis"
  engine_version             = var.redis_engine_version
  node_type                  = var.redis_node_type
  num_cache_clusters         = var.redis_nodes
  port                       = 6379
  subnet_group_name          = aws_elasticache_subnet_group.redis.name
  security_group_ids         = [aws_security_group.redis.id]
  automatic_failover_enabled = var.redis_automatic_failover
  multi_az_enabled           = var.redis_multi_az
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.payagg.arn
  transit_encryption_enabled = true
  auth_token                 = random_password.redis_auth.result
  snapshot_retention_limit   = var.redis_snapshot_retention_days
  auto_minor_version_upgrade = true

  lifecycle {
    precondition {
      condition     = !var.redis_multi_az || var.redis_automatic_failover
      error_message = "redis_multi_az needs redis_automatic_failover = true."
    }
    precondition {
      condition     = !var.redis_automatic_failover || var.redis_nodes >= 2
      error_message = "redis_automatic_failover needs redis_nodes >= 2 (a replica to fail over to)."
    }
  }
}

# One secret holds the token and the full URL built from it; the task reads only its `url` key.
resource "aws_secretsmanager_secret" "redis" {
  #checkov:skip=CKV2_AWS_57:rotating the token means a coordinated ElastiCache auth-token update (a Lambda); rotate with terraform apply -replace=random_password.redis_auth (see README)
  name_prefix             = "${var.name}/redis-"
  description             = "payagg Redis auth token and the rediss:// URL the proxy reads"
  kms_key_id              = aws_kms_key.payagg.arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "redis" {
  secret_id = aws_secretsmanager_secret.redis.id
  secret_string = jsonencode({
    auth_token = random_password.redis_auth.result
    url        = "rediss://:${random_password.redis_auth.result}@${aws_elasticache_replication_group.redis.primary_endpoint_address}:6379/0"
  })
}
