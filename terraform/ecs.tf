# One Fargate task holds the proxy and the two mock providers side by side: they share the task's
# network namespace, so the proxy reaches the mocks on 127.0.0.1 and nothing else can.

locals {
  image = "${aws_ecr_repository.payagg.repository_url}:${var.image_tag}"

  # The slim image has no curl; the standard library is enough to probe a health endpoint.
  health_probe = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:%d/healthz', timeout=2)"

  mocks = {
    mtn    = { port = 9101, failure_rate = var.mtn_failure_rate }
    airtel = { port = 9102, failure_rate = var.airtel_failure_rate }
  }

  # Settings every container shares: non-root, nothing written outside the ephemeral /tmp, logs to
  # CloudWatch, and 30 s between SIGTERM and SIGKILL because the proxy drains for up to 20 s.
  container_defaults = {
    image                  = local.image
    user                   = "10001"
    readonlyRootFilesystem = true
    stopTimeout            = 30
    linuxParameters        = { initProcessEnabled = true }
  }

  mock_containers = [
    for name, mock in local.mocks : merge(local.container_defaults, {
      name      = name
      essential = true
      command   = ["payagg-mock", "--provider", name, "--host", "127.0.0.1", "--port", tostring(mock.port)]
      environment = concat([
        { name = "MOCK_FAILURE_RATE", value = tostring(mock.failure_rate) },
        { name = "MOCK_DECLINE_RATE", value = tostring(var.mock_decline_rate) },
        { name = "MOCK_HANG_RATE", value = tostring(var.mock_hang_rate) },
        { name = "MOCK_LATENCY_MS", value = join(",", var.mock_latency_ms) },
        ], var.mock_seed == null ? [] : [
        { name = "MOCK_SEED", value = tostring(var.mock_seed) },
      ])
      healthCheck = {
        command     = ["CMD", "python", "-c", format(local.health_probe, mock.port)]
        interval    = 10
        timeout     = 5
        retries     = 3
        startPeriod = 10
      }
      mountPoints = [{ sourceVolume = "tmp-${name}", containerPath = "/tmp", readOnly = false }]
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.payagg.name
          awslogs-region        = data.aws_region.current.name
          awslogs-stream-prefix = name
        }
      }
    })
  ]

  proxy_container = merge(local.container_defaults, {
    name         = "proxy"
    essential    = true
    command      = ["payagg", "serve"]
    portMappings = [{ containerPort = 8080, protocol = "tcp" }]
    dependsOn    = [for name, _ in local.mocks : { containerName = name, condition = "HEALTHY" }]
    environment = [
      { name = "MTN_URL", value = "http://127.0.0.1:${local.mocks.mtn.port}" },
      { name = "AIRTEL_URL", value = "http://127.0.0.1:${local.mocks.airtel.port}" },
      { name = "PROVIDER_TIMEOUT_S", value = tostring(var.provider_timeout_s) },
      { name = "BREAKER_FAILURE_RATE_THRESHOLD", value = tostring(var.breaker_failure_rate_threshold) },
      { name = "BREAKER_MINIMUM_CALLS", value = tostring(var.breaker_minimum_calls) },
      { name = "BREAKER_WINDOW_S", value = tostring(var.breaker_window_s) },
      { name = "BREAKER_OPEN_S", value = tostring(var.breaker_open_s) },
      { name = "BREAKER_HALF_OPEN_MAX_CALLS", value = tostring(var.breaker_half_open_max_calls) },
      { name = "LOG_LEVEL", value = var.log_level },
    ]
    # REDIS_URL carries the auth token, so it is injected from Secrets Manager at start-up and never
    # appears in the task definition.
    secrets = [{ name = "REDIS_URL", valueFrom = "${aws_secretsmanager_secret.redis.arn}:url::" }]
    healthCheck = {
      command     = ["CMD", "python", "-c", format(local.health_probe, 8080)]
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
  })

  containers = concat([local.proxy_container], local.mock_containers)
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
    for_each = toset(["proxy", "mtn", "airtel"])
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

  # The proxy cannot start before the secret holds the Redis URL.
  depends_on = [aws_lb_listener.http, aws_secretsmanager_secret_version.redis]
}
