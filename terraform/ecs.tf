# One Fargate task holds the proxy and the two mock providers side by side: they share the task's
# network namespace, so the proxy reaches the mocks on 127.0.0.1 and nothing else can.

locals {
  image = "${aws_ecr_repository.payagg.repository_url}:${var.image_tag}"

  # Each task has mocks of its own, but any task's reconciler may ask about any payment: another
  # task's mock answering "not found" proves nothing. With more than one task a not-found never
  # makes a payment NOT_CREATED (it stays pending, then UNRESOLVED after give_up_after_s: never
  # guessed); with one task the mocks answer at once, as locally.
  not_found_grace_s = var.max_tasks > 1 ? "86400" : "0"

  # Each container is written out in full rather than merged from shared defaults, so that what ECS
  # receives can be read (and is checked by tests/test_terraform.py) key by key. All three run as
  # uid 10001 on a read-only root filesystem with a scratch /tmp, and get 30 s between SIGTERM and
  # SIGKILL because the proxy drains in-flight payments for up to 20 s. The slim image has no curl,
  # so the health checks use the standard library.
  proxy_container = {
    name                   = "proxy"
    image                  = local.image
    essential              = true
    command                = ["payagg", "serve", "--workers", tostring(var.proxy_workers)]
    user                   = "10001"
    readonlyRootFilesystem = true
    stopTimeout            = 30
    linuxParameters        = { initProcessEnabled = true }
    # 8080 for the ALB; 9090, the admin port (admin.tf), for metrics collectors: the one beside it
    # over loopback, others only from the security groups admin.tf admits. The ALB never sends to it.
    portMappings = [
      { containerPort = 8080, protocol = "tcp" },
      { containerPort = 9090, protocol = "tcp" },
    ]
    dependsOn = [
      { containerName = "mtn", condition = "HEALTHY" },
      { containerName = "airtel", condition = "HEALTHY" },
    ]
    environment = [
      { name = "MTN_URL", value = "http://127.0.0.1:9101" },
      { name = "AIRTEL_URL", value = "http://127.0.0.1:9102" },
      { name = "PROVIDER_TIMEOUT_S", value = tostring(var.provider_timeout_s) },
      { name = "BREAKER_FAILURE_RATE_THRESHOLD", value = tostring(var.breaker_failure_rate_threshold) },
      { name = "BREAKER_MINIMUM_CALLS", value = tostring(var.breaker_minimum_calls) },
      { name = "BREAKER_WINDOW_S", value = tostring(var.breaker_window_s) },
      { name = "BREAKER_OPEN_S", value = tostring(var.breaker_open_s) },
      { name = "BREAKER_HALF_OPEN_MAX_CALLS", value = tostring(var.breaker_half_open_max_calls) },
      { name = "LOG_LEVEL", value = var.log_level },
      # cluster for MemoryDB (cluster-only), standalone for ElastiCache; the config's redis.mode.
      { name = "REDIS_MODE", value = local.redis_mode },
      # Every payment request needs a client's key; production refuses `auth: off`.
      { name = "PAYAGG_AUTH", value = "required" },
      { name = "PAYAGG_ENVIRONMENT", value = "production" },
      { name = "PAYAGG_MERCHANT_RATE_PER_S", value = tostring(var.merchant_rate_per_s) },
      { name = "PAYAGG_MERCHANT_BURST", value = tostring(var.merchant_burst) },
      { name = "MTN_NOT_FOUND_GRACE_S", value = local.not_found_grace_s },
      { name = "AIRTEL_NOT_FOUND_GRACE_S", value = local.not_found_grace_s },
      # Providers call back here (callbacks.tf); the mocks beside the proxy do, through the ALB.
      { name = "PAYAGG_PUBLIC_URL", value = local.public_url },
    ]
    # REDIS_URL carries the auth token, PAYAGG_ADMIN_TOKEN opens the admin API: ECS resolves them
    # from Secrets Manager when the task starts, so none appears in the task definition. The client
    # key hashes come the same way.
    secrets = [
      { name = "REDIS_URL", valueFrom = "${aws_secretsmanager_secret.redis.arn}:url::" },
      { name = "PAYAGG_MERCHANT_KEY_SHA256", valueFrom = "${aws_secretsmanager_secret.client_keys.arn}:merchant::" },
      { name = "PAYAGG_ADMIN_TOKEN", valueFrom = "${aws_secretsmanager_secret.admin_token.arn}:token::" },
      # The providers' credentials and the callback secrets (provider_secrets.tf): the mocks get the same.
      { name = "PAYAGG_CALLBACK_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:callback_secret::" },
      { name = "MTN_API_USER", valueFrom = "${aws_secretsmanager_secret.providers.arn}:mtn_api_user::" },
      { name = "MTN_API_KEY", valueFrom = "${aws_secretsmanager_secret.providers.arn}:mtn_api_key::" },
      { name = "MTN_SUBSCRIPTION_KEY", valueFrom = "${aws_secretsmanager_secret.providers.arn}:mtn_subscription_key::" },
      { name = "AIRTEL_CLIENT_ID", valueFrom = "${aws_secretsmanager_secret.providers.arn}:airtel_client_id::" },
      { name = "AIRTEL_CLIENT_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:airtel_client_secret::" },
      { name = "AIRTEL_CALLBACK_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:airtel_callback_secret::" },
    ]
    healthCheck = {
      command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
      interval    = 10
      timeout     = 5
      retries     = 3
      startPeriod = 15
    }
    mountPoints = [{ sourceVolume = "tmp-proxy", containerPath = "/tmp", readOnly = false }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.payagg.name
        awslogs-region        = data.aws_region.current.name
        awslogs-stream-prefix = "proxy"
      }
    }
  }

  mtn_container = {
    name                   = "mtn"
    image                  = local.image
    essential              = true
    command                = ["payagg-mock", "--provider", "mtn", "--host", "127.0.0.1", "--port", "9101"]
    user                   = "10001"
    readonlyRootFilesystem = true
    stopTimeout            = 30
    linuxParameters        = { initProcessEnabled = true }
    environment = [
      { name = "MOCK_FAILURE_RATE", value = tostring(var.mtn_failure_rate) },
      { name = "MOCK_DECLINE_RATE", value = tostring(var.mock_decline_rate) },
      { name = "MOCK_HANG_RATE", value = tostring(var.mock_hang_rate) },
      { name = "MOCK_LATENCY_MS", value = join(",", var.mock_latency_ms) },
      { name = "MOCK_SEED", value = var.mock_seed == null ? "" : tostring(var.mock_seed) },
      { name = "MOCK_APPROVAL_MS", value = join(",", var.mock_approval_ms) },
      { name = "MOCK_ABANDON_RATE", value = tostring(var.mock_abandon_rate) },
      { name = "MOCK_APPROVAL_TIMEOUT_S", value = var.mock_approval_timeout_s == null ? "" : tostring(var.mock_approval_timeout_s) },
      { name = "MOCK_STATUS_FAILURE_RATE", value = tostring(var.mock_status_failure_rate) },
      { name = "MOCK_SYNC_DECLINES", value = tostring(var.mock_sync_declines) },
      { name = "MOCK_TOKEN_TTL_S", value = var.mock_token_ttl_s == null ? "" : tostring(var.mock_token_ttl_s) },
    ]
    # The only API user, key and subscription key the mock accepts: the proxy's (provider_secrets.tf).
    secrets = [
      { name = "MOCK_CLIENT_ID", valueFrom = "${aws_secretsmanager_secret.providers.arn}:mtn_api_user::" },
      { name = "MOCK_CLIENT_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:mtn_api_key::" },
      { name = "MOCK_SUBSCRIPTION_KEY", valueFrom = "${aws_secretsmanager_secret.providers.arn}:mtn_subscription_key::" },
    ]
    healthCheck = {
      command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9101/healthz', timeout=2)"]
      interval    = 10
      timeout     = 5
      retries     = 3
      startPeriod = 10
    }
    mountPoints = [{ sourceVolume = "tmp-mtn", containerPath = "/tmp", readOnly = false }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.payagg.name
        awslogs-region        = data.aws_region.current.name
        awslogs-stream-prefix = "mtn"
      }
    }
  }

  airtel_container = {
    name                   = "airtel"
    image                  = local.image
    essential              = true
    entryPoint             = ["python", "-c", local.airtel_mock_launcher] # MOCK_CALLBACK_URL, then the command (callbacks.tf)
    command                = ["payagg-mock", "--provider", "airtel", "--host", "127.0.0.1", "--port", "9102"]
    user                   = "10001"
    readonlyRootFilesystem = true
    stopTimeout            = 30
    linuxParameters        = { initProcessEnabled = true }
    environment = [
      { name = "MOCK_FAILURE_RATE", value = tostring(var.airtel_failure_rate) },
      { name = "MOCK_DECLINE_RATE", value = tostring(var.mock_decline_rate) },
      { name = "MOCK_HANG_RATE", value = tostring(var.mock_hang_rate) },
      { name = "MOCK_LATENCY_MS", value = join(",", var.mock_latency_ms) },
      { name = "MOCK_SEED", value = var.mock_seed == null ? "" : tostring(var.mock_seed) },
      { name = "MOCK_APPROVAL_MS", value = join(",", var.mock_approval_ms) },
      { name = "MOCK_ABANDON_RATE", value = tostring(var.mock_abandon_rate) },
      { name = "MOCK_APPROVAL_TIMEOUT_S", value = var.mock_approval_timeout_s == null ? "" : tostring(var.mock_approval_timeout_s) },
      { name = "MOCK_STATUS_FAILURE_RATE", value = tostring(var.mock_status_failure_rate) },
      { name = "MOCK_SYNC_DECLINES", value = tostring(var.mock_sync_declines) },
      { name = "MOCK_TOKEN_TTL_S", value = var.mock_token_ttl_s == null ? "" : tostring(var.mock_token_ttl_s) },
      # The base of the static callback URL the launcher (callbacks.tf) computes as MOCK_CALLBACK_URL.
      { name = "PAYAGG_PUBLIC_URL", value = local.public_url },
    ]
    # The proxy's client id and secret, Airtel's callback HMAC key (the proxy checks the `hash`
    # with it), and payagg's callback secret, which keys the static URL's token.
    secrets = [
      { name = "MOCK_CLIENT_ID", valueFrom = "${aws_secretsmanager_secret.providers.arn}:airtel_client_id::" },
      { name = "MOCK_CLIENT_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:airtel_client_secret::" },
      { name = "MOCK_CALLBACK_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:airtel_callback_secret::" },
      { name = "PAYAGG_CALLBACK_SECRET", valueFrom = "${aws_secretsmanager_secret.providers.arn}:callback_secret::" },
    ]
    healthCheck = {
      command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2)"]
      interval    = 10
      timeout     = 5
      retries     = 3
      startPeriod = 10
    }
    mountPoints = [{ sourceVolume = "tmp-airtel", containerPath = "/tmp", readOnly = false }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.payagg.name
        awslogs-region        = data.aws_region.current.name
        awslogs-stream-prefix = "airtel"
      }
    }
  }

  # The metrics collector (observability.tf): scrapes the proxy over the task's loopback and
  # remote-writes to the Prometheus workspace. Not essential: payments go on without it.
  collector_container = {
    name                   = "collector"
    image                  = var.adot_image
    essential              = false
    command                = ["--config=env:AOT_CONFIG_CONTENT"]
    user                   = "10001"
    readonlyRootFilesystem = true
    stopTimeout            = 30
    environment            = [{ name = "AOT_CONFIG_CONTENT", value = local.collector_config }]
    dependsOn              = [{ containerName = "proxy", condition = "START" }]
    healthCheck = {
      command     = ["CMD", "/healthcheck"] # the image's probe of the health_check extension
      interval    = 10
      timeout     = 5
      retries     = 3
      startPeriod = 10
    }
    mountPoints = [{ sourceVolume = "tmp-collector", containerPath = "/tmp", readOnly = false }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.payagg.name
        awslogs-region        = data.aws_region.current.name
        awslogs-stream-prefix = "collector"
      }
    }
  }

  containers = [local.proxy_container, local.mtn_container, local.airtel_container, local.collector_container]
}

resource "aws_cloudwatch_log_group" "payagg" {
  #checkov:skip=CKV_AWS_338:retention is the log_retention_days variable (30 days by default); a year is a compliance choice, not a default
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.payagg.arn
}

resource "aws_ecs_cluster" "payagg" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_task_definition" "payagg" {
  family                   = var.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn
  container_definitions    = jsonencode(local.containers)

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # Fargate task storage, one scratch /tmp per container: the root filesystems are read-only.
  dynamic "volume" {
    for_each = toset([for container in local.containers : container.name])
    content {
      name = "tmp-${volume.value}"
    }
  }
}

resource "aws_ecs_service" "payagg" {
  name                              = var.name
  cluster                           = aws_ecs_cluster.payagg.id
  task_definition                   = aws_ecs_task_definition.payagg.arn
  desired_count                     = var.min_tasks
  launch_type                       = "FARGATE"
  platform_version                  = "LATEST"
  health_check_grace_period_seconds = var.health_check_grace_period_s
  enable_execute_command            = false
  propagate_tags                    = "SERVICE"

  network_configuration {
    subnets          = module.vpc.private_subnets
    security_groups  = [aws_security_group.service.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.proxy.arn
    container_name   = "proxy"
    container_port   = 8080
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  # The autoscaler owns the task count once the service exists.
  lifecycle {
    ignore_changes = [desired_count]
  }

  # ECS refuses a target group that no listener rule forwards to yet, and the proxy cannot start
  # before the secrets hold the Redis URL and the provider credentials.
  depends_on = [aws_lb_listener_rule.http, aws_lb_listener_rule.https, aws_secretsmanager_secret_version.redis, aws_secretsmanager_secret_version.providers]
}
