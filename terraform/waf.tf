# An optional AWS WAF web ACL in front of the ALB (waf_enabled). Its first job is a rate limit per
# client address: a flood of POST /v1/pay would otherwise reach the tasks, open the providers'
# breakers for every merchant and fill the store with claims. It is a coarse guard per source IP;
# the per-client limits inside payagg stay the fine-grained ones. Blocked and counted requests are
# logged to an encrypted log group; allowed ones are already in the container (and access) logs.

locals {
  # One body for every request the rate rule blocks: the shape and code payagg itself answers when
  # a client exceeds its rate (429 rate_limited). WAF cannot set Retry-After: it prefixes custom
  # header names with x-amzn-waf-.
  waf_rate_limited_body = "{\"error\":\"rate_limited\",\"message\":\"too many requests from this address; retry in a few minutes\"}"
}

resource "aws_wafv2_web_acl" "alb" {
  count = var.waf_enabled ? 1 : 0

  name        = "${var.name}-alb"
  description = "payagg ALB: rate limit per source IP, known bad inputs"
  scope       = "REGIONAL"

  default_action {
    allow {}
  }

  custom_response_body {
    key          = "rate_limited"
    content_type = "APPLICATION_JSON"
    content      = local.waf_rate_limited_body
  }

  # First, so a flood is cut off before the managed rules spend their capacity on it.
  rule {
    name     = "rate-per-ip"
    priority = 10

    action {
      block {
        custom_response {
          response_code            = 429
          custom_response_body_key = "rate_limited"
        }
      }
    }

    statement {
      rate_based_statement {
        # Requests per source IP over the rolling 5-minute window WAF evaluates by default.
        limit              = var.waf_rate_limit_per_5min
        aggregate_key_type = "IP"
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-rate-per-ip"
      sampled_requests_enabled   = true
    }
  }

  # Request patterns known to exploit common software (Log4j JNDI lookups, Java deserialization,
  # localhost Host headers, exploitable paths). payagg runs none of it, but the rules cost little
  # and keep such probes out of the tasks' logs.
  rule {
    name     = "aws-known-bad-inputs"
    priority = 20

    override_action {
      none {}
    }

    statement {
      managed_rule_group_statement {
        name        = "AWSManagedRulesKnownBadInputsRuleSet"
        vendor_name = "AWS"
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-known-bad-inputs"
      sampled_requests_enabled   = true
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = "${var.name}-alb"
    sampled_requests_enabled   = true
  }
}

resource "aws_wafv2_web_acl_association" "alb" {
  count = var.waf_enabled ? 1 : 0

  resource_arn = aws_lb.payagg.arn
  web_acl_arn  = aws_wafv2_web_acl.alb[0].arn
}

resource "aws_cloudwatch_log_group" "waf" {
  #checkov:skip=CKV_AWS_338:retention is the log_retention_days variable (30 days by default); a year is a compliance choice, not a default
  count = var.waf_enabled ? 1 : 0

  # WAF writes only to log groups whose name starts with aws-waf-logs-.
  name              = "aws-waf-logs-${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.payagg.arn
}

resource "aws_wafv2_web_acl_logging_configuration" "alb" {
  count = var.waf_enabled ? 1 : 0

  resource_arn            = aws_wafv2_web_acl.alb[0].arn
  log_destination_configs = [aws_cloudwatch_log_group.waf[0].arn]

  # Client credentials never reach a log.
  redacted_fields {
    single_header {
      name = "authorization"
    }
  }

  logging_filter {
    default_behavior = "DROP"

    filter {
      behavior    = "KEEP"
      requirement = "MEETS_ANY"

      condition {
        action_condition {
          action = "BLOCK"
        }
      }

      condition {
        action_condition {
          action = "COUNT"
        }
      }
    }
  }
}
