# The public entry point. Only the routes of the contract's public API are forwarded to the proxy;
# every other request (/metrics, /v1/providers, /openapi.json, /readyz, the admin API) is answered 404
# by the ALB itself and never reaches a task. HTTP serves those routes until a certificate is given;
# from then on HTTP only redirects them and HTTPS (TLS 1.2+ policy) forwards.

locals {
  https_enabled = var.certificate_arn != ""

  # ECS deregisters a task from the target group, waits this long for in-flight requests, and only
  # then sends SIGTERM; the proxy drains for up to 20 s more within the 30 s stopTimeout. A payment
  # never takes longer than the provider timeout, so 20 s covers it with a margin.
  deregistration_delay_s = 20

  # CONTRACT.md section 2: "Through the load balancer only POST /v1/pay, GET /v1/payments/*,
  # PUT/POST /v1/callbacks/* and GET /healthz are reachable." ALB path patterns are case-sensitive
  # and `*` matches any characters, so each pattern stays under its own prefix. The ALB health check
  # reaches the task directly and needs no rule; the public /healthz is for uptime probes.
  public_routes = {
    pay       = { priority = 10, methods = ["POST"], paths = ["/v1/pay"] }
    payments  = { priority = 20, methods = ["GET"], paths = ["/v1/payments/*"] }
    callbacks = { priority = 30, methods = ["PUT", "POST"], paths = ["/v1/callbacks/*"] }
    healthz   = { priority = 40, methods = ["GET"], paths = ["/healthz"] }
  }

  # What the ALB answers for any other route: payagg's own 404 body, so a client sees one shape
  # whether the ALB or the proxy refused the path.
  not_found = {
    status_code  = "404"
    content_type = "application/json"
    message_body = "{\"error\":\"not_found\",\"message\":\"no such route\"}"
  }
}

resource "aws_lb" "payagg" {
  #checkov:skip=CKV_AWS_150:deletion protection is the alb_deletion_protection variable, off by default so terraform destroy works
  #checkov:skip=CKV_AWS_91:access logs are the enable_alb_access_logs variable, off by default to keep the demo free of a log bucket
  #checkov:skip=CKV2_AWS_20:HTTP redirects the public routes to HTTPS through listener rules once certificate_arn is set; without a certificate (a demo without a domain) it serves them, and answers 404 to everything else either way
  #checkov:skip=CKV2_AWS_76:the web ACL (waf.tf) has the Log4j rules (KnownBadInputs) but not AnonymousIpList, whose hosting-provider list would block merchants' servers and providers' callbacks, which run in clouds
  name                       = var.name
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = module.vpc.public_subnets
  security_groups            = [aws_security_group.alb.id]
  drop_invalid_header_fields = true
  enable_deletion_protection = var.alb_deletion_protection

  dynamic "access_logs" {
    for_each = var.enable_alb_access_logs ? [aws_s3_bucket.alb_logs[0].id] : []
    content {
      bucket  = access_logs.value
      prefix  = "alb"
      enabled = true
    }
  }

  depends_on = [aws_s3_bucket_policy.alb_logs]
}

resource "aws_lb_target_group" "proxy" {
  #checkov:skip=CKV_AWS_378:TLS ends at the ALB; the hop to the task stays inside the private subnets
  name                 = "${var.name}-proxy"
  target_type          = "ip"
  protocol             = "HTTP"
  port                 = 8080
  vpc_id               = module.vpc.vpc_id
  deregistration_delay = local.deregistration_delay_s

  health_check {
    path                = "/healthz"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "http" {
  #checkov:skip=CKV_AWS_2:HTTP serves the public routes only while certificate_arn is empty (a demo without a domain); with a certificate it only redirects them to HTTPS
  #checkov:skip=CKV_AWS_103:the TLS policy applies to the HTTPS listener; this one is plain HTTP by design
  load_balancer_arn = aws_lb.payagg.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "fixed-response"
    fixed_response {
      status_code  = local.not_found.status_code
      content_type = local.not_found.content_type
      message_body = local.not_found.message_body
    }
  }
}

resource "aws_lb_listener" "https" {
  count = local.https_enabled ? 1 : 0

  load_balancer_arn = aws_lb.payagg.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn

  default_action {
    type = "fixed-response"
    fixed_response {
      status_code  = local.not_found.status_code
      content_type = local.not_found.content_type
      message_body = local.not_found.message_body
    }
  }
}

# The public routes on port 80: forwarded while there is no certificate, redirected to HTTPS (same
# host, path and query) once there is one. Any other path gets the 404 above on either port.
resource "aws_lb_listener_rule" "http" {
  for_each = local.public_routes

  listener_arn = aws_lb_listener.http.arn
  priority     = each.value.priority

  action {
    type             = local.https_enabled ? "redirect" : "forward"
    target_group_arn = local.https_enabled ? null : aws_lb_target_group.proxy.arn

    dynamic "redirect" {
      for_each = local.https_enabled ? [1] : []
      content {
        protocol    = "HTTPS"
        port        = "443"
        status_code = "HTTP_301"
      }
    }
  }

  condition {
    http_request_method {
      values = each.value.methods
    }
  }

  condition {
    path_pattern {
      values = each.value.paths
    }
  }
}

resource "aws_lb_listener_rule" "https" {
  # A for expression rather than `cond ? routes : {}`: the two branches of a conditional must
  # have one type, and an empty object is not the routes' type.
  for_each = { for name, route in local.public_routes : name => route if local.https_enabled }

  listener_arn = aws_lb_listener.https[0].arn
  priority     = each.value.priority

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.proxy.arn
  }

  condition {
    http_request_method {
      values = each.value.methods
    }
  }

  condition {
    path_pattern {
      values = each.value.paths
    }
  }
}

# Optional access logs. ALB log delivery only supports SSE-S3, not KMS.

resource "aws_s3_bucket" "alb_logs" {
  #checkov:skip=CKV_AWS_145:ALB access log delivery supports only SSE-S3 encryption, not KMS
  #checkov:skip=CKV_AWS_18:this is the access-log bucket; logging it to another bucket would recurse
  #checkov:skip=CKV_AWS_144:cross-region replication of load balancer logs is out of scope for this deployment
  #checkov:skip=CKV2_AWS_62:nothing consumes events from the log bucket
  count         = var.enable_alb_access_logs ? 1 : 0
  bucket_prefix = "${var.name}-alb-logs-"
}

resource "aws_s3_bucket_public_access_block" "alb_logs" {
  count                   = var.enable_alb_access_logs ? 1 : 0
  bucket                  = aws_s3_bucket.alb_logs[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "alb_logs" {
  count  = var.enable_alb_access_logs ? 1 : 0
  bucket = aws_s3_bucket.alb_logs[0].id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "alb_logs" {
  count  = var.enable_alb_access_logs ? 1 : 0
  bucket = aws_s3_bucket.alb_logs[0].id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "alb_logs" {
  count  = var.enable_alb_access_logs ? 1 : 0
  bucket = aws_s3_bucket.alb_logs[0].id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}

    expiration {
      days = var.log_retention_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 1
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_elb_service_account" "current" {
  count = var.enable_alb_access_logs ? 1 : 0
}

data "aws_iam_policy_document" "alb_logs" {
  count = var.enable_alb_access_logs ? 1 : 0

  # Regions opened before August 2022 deliver as their regional ELB account, newer ones as the
  # log-delivery service principal; granting both works everywhere.
  statement {
    sid       = "ElbLogDelivery"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.alb_logs[0].arn}/alb/AWSLogs/${data.aws_caller_identity.current.account_id}/*"]
    principals {
      type        = "AWS"
      identifiers = [data.aws_elb_service_account.current[0].arn]
    }
    principals {
      type        = "Service"
      identifiers = ["logdelivery.elasticloadbalancing.amazonaws.com"]
    }
  }

  statement {
    sid       = "DenyPlainHttp"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.alb_logs[0].arn, "${aws_s3_bucket.alb_logs[0].arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "alb_logs" {
  count  = var.enable_alb_access_logs ? 1 : 0
  bucket = aws_s3_bucket.alb_logs[0].id
  policy = data.aws_iam_policy_document.alb_logs[0].json

  depends_on = [aws_s3_bucket_public_access_block.alb_logs]
}
