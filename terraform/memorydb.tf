# MemoryDB (store = "memorydb", the default): the durable store of record. A write is acknowledged
# only once it is in a transaction log kept across availability zones, so neither a node failure nor
# a failover loses an acknowledged payment record. Cluster mode only, TLS only, and the proxy
# authenticates as its own ACL user.

locals {
  memorydb_user = "${var.name}-proxy"
}

resource "aws_memorydb_subnet_group" "store" {
  count = local.memorydb ? 1 : 0

  name       = "${var.name}-store"
  subnet_ids = module.vpc.private_subnets
}

# Never evict: a full store refuses writes (the proxy answers 503 and calls no provider) instead of
# dropping a payment record or an idempotency key to make room.
resource "aws_memorydb_parameter_group" "store" {
  count = local.memorydb ? 1 : 0

  name        = "${var.name}-store"
  family      = "memorydb_redis${local.redis_major}"
  description = "payagg: never evict"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "aws_memorydb_user" "proxy" {
  count = local.memorydb ? 1 : 0

  user_name = local.memorydb_user
  # Every key and data command, none of the dangerous ones (FLUSHALL, CONFIG, KEYS, DEBUG, ...):
  # the proxy needs only scripts and plain reads and writes.
  access_string = "on ~* &* +@all -@dangerous"

  authentication_mode {
    type      = "password"
    passwords = [random_password.redis_auth.result]
  }
}

resource "aws_memorydb_acl" "store" {
  count = local.memorydb ? 1 : 0

  name       = "${var.name}-store"
  user_names = [aws_memorydb_user.proxy[0].user_name]
}

resource "aws_memorydb_cluster" "store" {
  count = local.memorydb ? 1 : 0

  name                       = "${var.name}-store"
  description                = "payagg store of record"
  engine_version             = var.redis_engine_version
  node_type                  = var.memorydb_node_type
  num_shards                 = var.memorydb_shards
  num_replicas_per_shard     = var.memorydb_replicas_per_shard
  port                       = 6379
  acl_name                   = aws_memorydb_acl.store[0].name
  parameter_group_name       = aws_memorydb_parameter_group.store[0].name
  subnet_group_name          = aws_memorydb_subnet_group.store[0].name
  security_group_ids         = [aws_security_group.redis.id]
  tls_enabled                = true
  kms_key_arn                = aws_kms_key.payagg.arn
  snapshot_retention_limit   = var.redis_snapshot_retention_days
  auto_minor_version_upgrade = true
}
