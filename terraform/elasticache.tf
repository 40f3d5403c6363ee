# ElastiCache for Redis (store = "elasticache"): the cheaper store for demos. Replication is
# asynchronous, so a failover can lose the writes the primary acknowledged but had not yet passed to
# its replica; README.md says what that means for payments.

resource "aws_elasticache_subnet_group" "redis" {
  count = local.memorydb ? 0 : 1

  name       = "${var.name}-redis"
  subnet_ids = module.vpc.private_subnets
}

# Never evict: a full store refuses writes (the proxy answers 503 and calls no provider) instead of
# dropping a payment record or an idempotency key to make room.
resource "aws_elasticache_parameter_group" "redis" {
  count = local.memorydb ? 0 : 1

  name        = "${var.name}-redis"
  family      = local.redis_major == "6" ? "redis6.x" : "redis7"
  description = "payagg: never evict"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "aws_elasticache_replication_group" "redis" {
  count = local.memorydb ? 0 : 1

  replication_group_id       = "${var.name}-redis"
  description                = "payagg idempotency store"
  engine                     = "redis"
  engine_version             = var.redis_engine_version
  node_type                  = var.redis_node_type
  num_cache_clusters         = var.redis_nodes
  port                       = 6379
  parameter_group_name       = aws_elasticache_parameter_group.redis[0].name
  subnet_group_name          = aws_elasticache_subnet_group.redis[0].name
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

# Deployments made before the store choice keep their ElastiCache group (no replacement).
moved {
  from = aws_elasticache_subnet_group.redis
  to   = aws_elasticache_subnet_group.redis[0]
}

moved {
  from = aws_elasticache_replication_group.redis
  to   = aws_elasticache_replication_group.redis[0]
}
