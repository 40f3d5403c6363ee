# The store of record: idempotency keys and payment records. The proxy fails closed when it cannot
# write, so the store's availability is the gateway's, and what the store can lose is what payagg's
# record can lose. `var.store` picks MemoryDB (memorydb.tf: durable, the default) or ElastiCache
# (elasticache.tf: cheaper, with a loss window at failover); this file holds what both share.

locals {
  memorydb = var.store == "memorydb"
  # The engine's major version names the parameter-group families (redis7, memorydb_redis7).
  redis_major = split(".", var.redis_engine_version)[0]

  # MemoryDB is cluster-only (the proxy must follow MOVED redirections) and authenticates an ACL
  # user; ElastiCache here is one primary with replicas, reached as a single server with the token.
  redis_mode = local.memorydb ? "cluster" : "standalone"
  redis_host = (
    local.memorydb
    ? aws_memorydb_cluster.store[0].cluster_endpoint[0].address
    : aws_elasticache_replication_group.redis[0].primary_endpoint_address
  )
  # MemoryDB has one database; ElastiCache's first is named as the shipped config's default is.
  redis_url = (
    local.memorydb
    ? "rediss://${local.memorydb_user}:${random_password.redis_auth.result}@${local.redis_host}:6379"
    : "rediss://:${random_password.redis_auth.result}@${local.redis_host}:6379/0"
  )
}

resource "random_password" "redis_auth" {
  # The ElastiCache auth token or the MemoryDB user's password. Alphanumeric only: it is embedded in
  # the rediss:// URL, where '#', '&' or '<' would need escaping, and both services forbid several
  # other symbols. 64 characters is still ~380 bits.
  length  = 64
  special = false
}

# One secret holds the password and the full URL built from it; the task reads only its `url` key.
resource "aws_secretsmanager_secret" "redis" {
  #checkov:skip=CKV2_AWS_57:rotating the password means a coordinated store-side update (a Lambda); rotate with terraform apply -replace=random_password.redis_auth (see README)
  name_prefix             = "${var.name}/redis-"
  description             = "payagg store password and the rediss:// URL the proxy reads"
  kms_key_id              = aws_kms_key.payagg.arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "redis" {
  secret_id = aws_secretsmanager_secret.redis.id
  secret_string = jsonencode({
    auth_token = random_password.redis_auth.result
    url        = local.redis_url
  })
}
