# Metrics, alerts and alarms. An AWS Distro for OpenTelemetry collector runs in every task (ecs.tf,
# container "collector"), scrapes the proxy's /metrics over the task's loopback and remote-writes to
# an Amazon Managed Service for Prometheus workspace. The workspace evaluates ops/prometheus/alerts.yml,
# the same file compose's Prometheus loads and `make test` checks with promtool, and its alert
# manager sends to an SNS topic. CloudWatch alarms cover what the proxy cannot see about itself
# (the load balancer, the task count, the store, CPU) and go to the same topic.

variable "adot_image" {
  description = "The AWS Distro for OpenTelemetry collector image run beside the proxy (pinned tag)."
  type        = string
  default     = "public.ecr.aws/aws-observability/aws-otel-collector:v0.40.0"
}

variable "metrics_scrape_interval_s" {
  description = "How often the collector scrapes the proxy's /metrics, in seconds."
  type        = number
  default     = 15
}

variable "alert_email" {
  description = "An address subscribed to the alerts topic (it must confirm the subscription); null for none."
  type        = string
  default     = null
}

variable "alarm_5xx_percent" {
  description = "ALB alarm: share of requests answered 5xx (by the load balancer or a task), in percent, over 5 minutes."
  type        = number
  default     = 10
}

variable "alarm_cpu_percent" {
  description = "ECS alarm: the service's average CPU utilisation, in percent, for 10 minutes."
  type        = number
  default     = 80
}

variable "alarm_store_memory_percent" {
  description = "Store alarm: memory used by the Redis data set, in percent; the store runs noeviction, so full means refused writes."
  type        = number
  default     = 75
}

locals {
  # The collector's configuration, given to it in AOT_CONFIG_CONTENT. `instance` becomes the ECS
  # task id (every task scrapes 127.0.0.1:9090, which would merge their series).
  collector_config = yamlencode({
    extensions = {
      sigv4auth    = { region = data.aws_region.current.name, service = "aps" }
      health_check = {}
    }
    receivers = {
      prometheus = {
        config = {
          scrape_configs = [{
            # The alert rules select job="payagg". The admin port (server.admin_port): the
            # collector shares the task's loopback, so no port mapping or rule is needed.
            job_name        = "payagg"
            scrape_interval = "${var.metrics_scrape_interval_s}s"
            metrics_path    = "/metrics"
            static_configs  = [{ targets = ["127.0.0.1:9090"] }]
          }]
        }
      }
    }
    processors = {
      "resourcedetection/ecs" = { detectors = ["env", "ecs"], timeout = "2s", override = false }
      "resource/instance" = {
        attributes = [{ key = "service.instance.id", from_attribute = "aws.ecs.task.id", action = "upsert" }]
      }
      batch = {}
    }
    exporters = {
      prometheusremotewrite = {
        endpoint = "${aws_prometheus_workspace.payagg.prometheus_endpoint}api/v1/remote_write"
        auth     = { authenticator = "sigv4auth" }
      }
    }
    service = {
      extensions = ["sigv4auth", "health_check"]
      pipelines = {
        metrics = {
          receivers  = ["prometheus"]
          processors = ["resourcedetection/ecs", "resource/instance", "batch"]
          exporters  = ["prometheusremotewrite"]
        }
      }
    }
  })

  alarm_actions = [aws_sns_topic.alerts.arn]
  # AMP's alert manager and CloudWatch alarms publish to the alerts topic.
  alert_publishers = ["aps.amazonaws.com", "cloudwatch.amazonaws.com"]
  ecs_dimensions = {
    ClusterName = aws_ecs_cluster.payagg.name
    ServiceName = aws_ecs_service.payagg.name
  }
}

# --- Amazon Managed Service for Prometheus ----------------------------------------------------

resource "aws_cloudwatch_log_group" "prometheus" {
  #checkov:skip=CKV_AWS_338:retention is the log_retention_days variable (30 days by default); a year is a compliance choice, not a default
  name              = "/aps/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.payagg.arn
}

resource "aws_prometheus_workspace" "payagg" {
  alias       = var.name
  kms_key_arn = aws_kms_key.alerts.arn

  logging_configuration {
    log_group_arn = "${aws_cloudwatch_log_group.prometheus.arn}:*"
  }
}

resource "aws_prometheus_rule_group_namespace" "payagg" {
  name         = "payagg"
  workspace_id = aws_prometheus_workspace.payagg.id
  # The very file `make test` checks with promtool and the live Prometheus test.
  data = file("${path.module}/../ops/prometheus/alerts.yml")
}

resource "aws_prometheus_alert_manager_definition" "payagg" {
  workspace_id = aws_prometheus_workspace.payagg.id
  definition   = <<-EOT
    alertmanager_config: |
      route:
        receiver: sns
        group_by: [alertname, provider]
        group_wait: 30s
        group_interval: 5m
        repeat_interval: 4h
      receivers:
        - name: sns
          sns_configs:
            - topic_arn: ${aws_sns_topic.alerts.arn}
              sigv4:
                region: ${data.aws_region.current.name}
              subject: "payagg {{ .CommonLabels.severity }}: {{ .CommonLabels.alertname }}"
              attributes:
                severity: "{{ .CommonLabels.severity }}"
  EOT
}

data "aws_iam_policy_document" "remote_write" {
  statement {
    sid       = "CollectorRemoteWritesToTheWorkspace"
    actions   = ["aps:RemoteWrite"]
    resources = [aws_prometheus_workspace.payagg.arn]
  }
}

resource "aws_iam_role_policy" "task_remote_write" {
  name   = "remote-write-metrics"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.remote_write.json
}

# --- the alerts topic ---------------------------------------------------------------------------

# A key of its own: the services that publish (AMP's alert manager, CloudWatch alarms) need to
# encrypt with it, which the store's key must not allow. Its administration is the store key's
# (kms.tf), plus the publishers.
data "aws_iam_policy_document" "alerts_key" {
  source_policy_documents = [data.aws_iam_policy_document.kms.json]

  statement {
    sid       = "PublishersEncryptAlerts"
    actions   = ["kms:GenerateDataKey*", "kms:Decrypt"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = local.alert_publishers
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_kms_key" "alerts" {
  description             = "${var.name}: alerts topic and metrics workspace"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.alerts_key.json
}

resource "aws_sns_topic" "alerts" {
  name              = "${var.name}-alerts"
  kms_master_key_id = aws_kms_key.alerts.arn
}

data "aws_iam_policy_document" "alerts_topic" {
  statement {
    sid       = "AlertManagerAndAlarmsPublish"
    actions   = ["sns:Publish", "sns:GetTopicAttributes"]
    resources = [aws_sns_topic.alerts.arn]
    principals {
      type        = "Service"
      identifiers = local.alert_publishers
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alerts" {
  arn    = aws_sns_topic.alerts.arn
  policy = data.aws_iam_policy_document.alerts_topic.json
}

resource "aws_sns_topic_subscription" "alert_email" {
  count     = var.alert_email == null ? 0 : 1
  topic_arn = aws_sns_topic.alerts.arn
  protocol  = "email"
  endpoint  = var.alert_email
}

# --- CloudWatch alarms ------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "alb_5xx" {
  alarm_name          = "${var.name}-alb-5xx-rate"
  alarm_description   = "More than ${var.alarm_5xx_percent}% of requests answered 5xx for 10 minutes. payagg answers 502/503 when a provider fails or its breaker is open: check the Prometheus alerts first (PayaggCircuitBreakerOpen, PayaggStoreUnavailable); 5xx from the load balancer itself (no healthy target) show as payagg-unhealthy-targets."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_5xx_percent
  evaluation_periods  = 2
  datapoints_to_alarm = 2
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id          = "rate"
    expression  = "100 * (FILL(elb, 0) + FILL(target, 0)) / requests"
    label       = "5xx percent"
    return_data = true
  }

  dynamic "metric_query" {
    for_each = {
      elb      = "HTTPCode_ELB_5XX_Count"
      target   = "HTTPCode_Target_5XX_Count"
      requests = "RequestCount"
    }
    content {
      id = metric_query.key
      metric {
        namespace   = "AWS/ApplicationELB"
        metric_name = metric_query.value
        dimensions  = { LoadBalancer = aws_lb.payagg.arn_suffix }
        period      = 300
        stat        = "Sum"
      }
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "unhealthy_targets" {
  alarm_name          = "${var.name}-unhealthy-targets"
  alarm_description   = "A proxy task fails the load balancer's /healthz check for 3 minutes: see the ECS service's events and the task's stopped reason."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = { LoadBalancer = aws_lb.payagg.arn_suffix, TargetGroup = aws_lb_target_group.proxy.arn_suffix }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "tasks_below_desired" {
  alarm_name          = "${var.name}-tasks-below-desired"
  alarm_description   = "Fewer proxy tasks run than the service wants, for 5 minutes: tasks crash or cannot start (image pull, secret, capacity). See the ECS service's events."
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id          = "missing"
    expression  = "desired - running"
    label       = "tasks missing"
    return_data = true
  }

  dynamic "metric_query" {
    for_each = { desired = "DesiredTaskCount", running = "RunningTaskCount" }
    content {
      id = metric_query.key
      metric {
        namespace   = "ECS/ContainerInsights"
        metric_name = metric_query.value
        dimensions  = local.ecs_dimensions
        period      = 60
        stat        = "Average"
      }
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "cpu" {
  alarm_name          = "${var.name}-cpu"
  alarm_description   = "The proxy tasks' average CPU is above ${var.alarm_cpu_percent}% for 10 minutes: autoscaling is at its maximum or too slow; raise max_tasks or proxy_workers."
  namespace           = "AWS/ECS"
  metric_name         = "CPUUtilization"
  dimensions          = local.ecs_dimensions
  statistic           = "Average"
  period              = 60
  evaluation_periods  = 10
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_cpu_percent
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# The store: MemoryDB publishes per cluster, ElastiCache per node (`<group>-001`, `-002`, ...).
locals {
  store_alarm_targets = (
    local.memorydb
    ? { cluster = { namespace = "AWS/MemoryDB", dimensions = { ClusterName = aws_memorydb_cluster.store[0].name } } }
    : {
      for index in range(var.redis_nodes) : format("node-%03d", index + 1) => {
        namespace  = "AWS/ElastiCache"
        dimensions = { CacheClusterId = format("%s-%03d", aws_elasticache_replication_group.redis[0].replication_group_id, index + 1) }
      }
    }
  )
}

resource "aws_cloudwatch_metric_alarm" "store_memory" {
  for_each            = local.store_alarm_targets
  alarm_name          = "${var.name}-store-memory-${each.key}"
  alarm_description   = "The store's data set uses more than ${var.alarm_store_memory_percent}% of its memory. It runs noeviction: when full, writes fail and payagg refuses payments (503). Scale the node type or shards, or shorten idempotency.result_ttl_s."
  namespace           = each.value.namespace
  metric_name         = "DatabaseMemoryUsagePercentage"
  dimensions          = each.value.dimensions
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_store_memory_percent
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "store_evictions" {
  for_each            = local.store_alarm_targets
  alarm_name          = "${var.name}-store-evictions-${each.key}"
  alarm_description   = "The store evicted keys. Under noeviction this must never happen: an evicted record is a payment payagg forgot. Check the parameter group's maxmemory-policy now."
  namespace           = each.value.namespace
  metric_name         = "Evictions"
  dimensions          = each.value.dimensions
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}
