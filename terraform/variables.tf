# --- Placement and naming ---------------------------------------------------------------------

variable "aws_region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Prefix for every resource name (ECS cluster, ALB, ECR repository, Redis)."
  type        = string
  default     = "payagg"

  validation {
    # The ALB target group name ("<name>-proxy") is limited to 32 characters.
    condition     = can(regex("^[a-z][a-z0-9-]{0,19}[a-z0-9]$", var.name))
    error_message = "name must be 2-21 lower-case letters, digits or hyphens, starting with a letter."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC; /16 or larger (each subnet is a /24 carved from it)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) <= 16, false)
    error_message = "vpc_cidr must be a valid IPv4 CIDR block of prefix length /16 or shorter."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for both AZs (cheaper) instead of one per AZ (survives an AZ outage)."
  type        = bool
  default     = true
}

variable "enable_vpc_flow_logs" {
  description = "Send VPC flow logs to an encrypted CloudWatch log group."
  type        = bool
  default     = true
}

# --- Image and task ---------------------------------------------------------------------------

variable "image_tag" {
  description = "Tag of the payagg image in the ECR repository (immutable tags: use a version or git SHA)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$", var.image_tag)) && var.image_tag != "latest"
    error_message = "image_tag must be a valid Docker tag other than \"latest\" (tags are immutable)."
  }
}

variable "ecr_images_to_keep" {
  description = "How many images the ECR lifecycle policy keeps; older ones expire."
  type        = number
  default     = 30

  validation {
    condition     = var.ecr_images_to_keep >= 1
    error_message = "ecr_images_to_keep must be at least 1."
  }
}

variable "task_cpu" {
  description = "Fargate task CPU units, shared by the proxy and both mocks (1024 = 1 vCPU)."
  type        = number
  default     = 512

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.task_cpu)
    error_message = "task_cpu must be one of 256, 512, 1024, 2048, 4096."
  }
}

variable "proxy_workers" {
  description = "payagg serve --workers: proxy processes sharing port 8080; about one per vCPU of task_cpu."
  type        = number
  default     = 1

  validation {
    condition     = var.proxy_workers >= 1 && var.proxy_workers <= 16
    error_message = "proxy_workers must be between 1 and 16."
  }
}

variable "task_memory" {
  description = "Fargate task memory in MiB, shared by the three containers; must suit task_cpu."
  type        = number
  default     = 1024

  validation {
    condition     = var.task_memory >= 512 && var.task_memory <= 30720
    error_message = "task_memory must be between 512 and 30720 MiB."
  }
}

variable "cpu_architecture" {
  description = "CPU architecture of the image: X86_64, or ARM64 for a Graviton-built image (about 20% cheaper)."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

variable "log_retention_days" {
  description = "Retention in days of the container and flow-log groups (and of ALB access logs)."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a retention period CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ... 3653)."
  }
}

# --- Service and autoscaling ------------------------------------------------------------------

variable "min_tasks" {
  description = "Minimum (and initial) number of running tasks; 2 keeps one per AZ."
  type        = number
  default     = 2

  validation {
    condition     = var.min_tasks >= 1
    error_message = "min_tasks must be at least 1."
  }
}

variable "max_tasks" {
  description = "Maximum number of tasks the autoscaler may run."
  type        = number
  default     = 6

  validation {
    condition     = var.max_tasks >= 1
    error_message = "max_tasks must be at least 1."
  }
}

variable "scale_requests_per_task" {
  description = "Target ALB requests per task per minute (ALBRequestCountPerTarget)."
  type        = number
  default     = 1000

  validation {
    condition     = var.scale_requests_per_task > 0
    error_message = "scale_requests_per_task must be positive."
  }
}

variable "scale_cpu_percent" {
  description = "Target average CPU utilisation of the service, in percent."
  type        = number
  default     = 60

  validation {
    condition     = var.scale_cpu_percent > 0 && var.scale_cpu_percent <= 100
    error_message = "scale_cpu_percent must be in (0, 100]."
  }
}

variable "health_check_grace_period_s" {
  description = "Seconds ECS ignores ALB health checks after a task starts (the mocks must turn healthy first)."
  type        = number
  default     = 60

  validation {
    condition     = var.health_check_grace_period_s >= 0 && var.health_check_grace_period_s <= 2147483647
    error_message = "health_check_grace_period_s must be >= 0."
  }
}

# --- Load balancer ----------------------------------------------------------------------------

variable "certificate_arn" {
  description = "ACM certificate ARN for the HTTPS listener; empty means HTTP only (HTTP then forwards instead of redirecting)."
  type        = string
  default     = ""

  validation {
    condition     = var.certificate_arn == "" || can(regex("^arn:aws[a-z-]*:acm:", var.certificate_arn))
    error_message = "certificate_arn must be empty or an ACM certificate ARN."
  }
}

variable "ssl_policy" {
  description = "TLS policy of the HTTPS listener."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"

  validation {
    condition     = startswith(var.ssl_policy, "ELBSecurityPolicy-TLS13-") || startswith(var.ssl_policy, "ELBSecurityPolicy-FS-1-2-")
    error_message = "ssl_policy must be a TLS 1.2+ policy (ELBSecurityPolicy-TLS13-* or ELBSecurityPolicy-FS-1-2-*)."
  }
}

variable "alb_ingress_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the ALB on 80 (and 443 with a certificate). The default, the whole internet, is what a demo called from anywhere needs; in production narrow it to the merchants' and providers' addresses (or to a CDN's)."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    # cidrnetmask accepts IPv4 only; cidrsubnet(cidr, 0, 0) is the block with its host bits cleared,
    # which AWS would store instead of what was written (a perpetual diff, or a wider block than meant).
    condition     = length(var.alb_ingress_cidrs) > 0 && alltrue([for cidr in var.alb_ingress_cidrs : can(cidrnetmask(cidr)) && try(cidrsubnet(cidr, 0, 0) == cidr, false)])
    error_message = "alb_ingress_cidrs must be a non-empty list of IPv4 CIDR blocks written with their host bits zero, e.g. 203.0.113.0/24 or 198.51.100.7/32."
  }
}

variable "alb_deletion_protection" {
  description = "Protect the ALB from deletion (turn on in production; terraform destroy then fails until it is off)."
  type        = bool
  default     = false
}

variable "enable_alb_access_logs" {
  description = "Write ALB access logs to a new encrypted, private S3 bucket."
  type        = bool
  default     = false
}

variable "waf_enabled" {
  description = "Put an AWS WAF web ACL in front of the ALB: a rate limit per source IP (waf_rate_limit_per_5min) and AWS's known-bad-inputs rules, blocked requests logged. About $7/month plus $0.60 per million requests; off only for the cheapest throw-away demo."
  type        = bool
  default     = true
}

variable "waf_rate_limit_per_5min" {
  description = "Requests one source IP may send through the ALB in any 5 minutes before WAF answers 429 (waf_enabled). 3000 is 10 a second sustained: above a merchant's own pace in a demo, far below a flood; a merchant behind one NAT address needs more."
  type        = number
  default     = 3000

  validation {
    # WAF's own bounds for a rate-based rule.
    condition     = var.waf_rate_limit_per_5min >= 100 && var.waf_rate_limit_per_5min <= 2000000000 && floor(var.waf_rate_limit_per_5min) == var.waf_rate_limit_per_5min
    error_message = "waf_rate_limit_per_5min must be a whole number from 100 to 2000000000."
  }
}

variable "public_url" {
  description = "PAYAGG_PUBLIC_URL: where providers reach payagg (server.public_url), the base of every callback URL. null: http://<the ALB's DNS name>; with certificate_arn, set it to https://<the certificate's domain> (a name pointing at the ALB)."
  type        = string
  default     = null

  validation {
    # No port and no query: the callbacks' security-group rules open 80 or 443 by the scheme.
    condition     = var.public_url == null || can(regex("^https?://[A-Za-z0-9.-]+(/[^?#:]*)?$", var.public_url))
    error_message = "public_url must be null or an http:// or https:// URL without a port or query, e.g. https://pay.example.com."
  }
}

# --- The store (Redis protocol: MemoryDB or ElastiCache) -------------------------------------

variable "store" {
  description = "The store of record: memorydb (durable, Multi-AZ transaction log, cluster mode, TLS, an ACL user) or elasticache (cheaper for demos; asynchronous replication can lose the last writes at a failover)."
  type        = string
  default     = "memorydb"

  validation {
    condition     = contains(["memorydb", "elasticache"], var.store)
    error_message = "store must be \"memorydb\" or \"elasticache\"."
  }
}

variable "memorydb_node_type" {
  description = "MemoryDB node type (store = memorydb)."
  type        = string
  default     = "db.t4g.small"

  validation {
    condition     = startswith(var.memorydb_node_type, "db.")
    error_message = "memorydb_node_type must be a MemoryDB node type such as db.t4g.small."
  }
}

variable "memorydb_shards" {
  description = "MemoryDB shards (store = memorydb); one holds a demo's keys, more spread the writes."
  type        = number
  default     = 1

  validation {
    condition     = var.memorydb_shards >= 1 && var.memorydb_shards <= 500
    error_message = "memorydb_shards must be between 1 and 500."
  }
}

variable "memorydb_replicas_per_shard" {
  description = "MemoryDB replicas per shard (store = memorydb), placed in other AZs than their primary; 0 still loses no acknowledged write but fails over slowly."
  type        = number
  default     = 1

  validation {
    condition     = var.memorydb_replicas_per_shard >= 0 && var.memorydb_replicas_per_shard <= 5
    error_message = "memorydb_replicas_per_shard must be between 0 and 5."
  }
}

variable "redis_node_type" {
  description = "ElastiCache node type (store = elasticache)."
  type        = string
  default     = "cache.t4g.micro"

  validation {
    condition     = startswith(var.redis_node_type, "cache.")
    error_message = "redis_node_type must be an ElastiCache node type such as cache.t4g.micro."
  }
}

variable "redis_engine_version" {
  description = "Redis engine version of either store."
  type        = string
  default     = "7.1"

  validation {
    # The major version names the parameter-group family (redis7, memorydb_redis7).
    condition     = can(regex("^[67]\\.[0-9]+$", var.redis_engine_version))
    error_message = "redis_engine_version must be a Redis 6.x or 7.x version such as 7.1."
  }
}

variable "redis_nodes" {
  description = "ElastiCache nodes (store = elasticache): one primary plus replicas; automatic failover needs at least 2."
  type        = number
  default     = 2

  validation {
    condition     = var.redis_nodes >= 1 && var.redis_nodes <= 6
    error_message = "redis_nodes must be between 1 and 6."
  }
}

variable "redis_automatic_failover" {
  description = "ElastiCache (store = elasticache): promote a replica automatically when the primary fails."
  type        = bool
  default     = true
}

variable "redis_multi_az" {
  description = "ElastiCache (store = elasticache): keep the replica in another AZ than the primary (needs redis_automatic_failover)."
  type        = bool
  default     = true
}

variable "redis_snapshot_retention_days" {
  description = "Days of daily snapshots of either store to keep (0 disables them)."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_snapshot_retention_days >= 0 && var.redis_snapshot_retention_days <= 35
    error_message = "redis_snapshot_retention_days must be between 0 and 35."
  }
}

variable "secret_recovery_window_days" {
  description = "Days a deleted secret (Redis URL, client keys, admin token, provider credentials) stays recoverable (0 deletes it at once)."
  type        = number
  default     = 7

  validation {
    condition     = var.secret_recovery_window_days == 0 || (var.secret_recovery_window_days >= 7 && var.secret_recovery_window_days <= 30)
    error_message = "secret_recovery_window_days must be 0 or between 7 and 30."
  }
}

# --- The proxy's configuration (environment of the shipped gateway.yaml) ----------------------

variable "provider_timeout_s" {
  description = "PROVIDER_TIMEOUT_S: seconds the proxy waits for a provider's answer; after that the outcome is unknown (202 PENDING, reconciled)."
  type        = number
  default     = 5

  validation {
    condition     = var.provider_timeout_s > 0 && var.provider_timeout_s <= 15
    error_message = "provider_timeout_s must be in (0, 15]: a payment must finish inside the 20 s drain window."
  }
}

variable "breaker_failure_rate_threshold" {
  description = "BREAKER_FAILURE_RATE_THRESHOLD: failures/calls at which a provider's breaker opens."
  type        = number
  default     = 0.6

  validation {
    condition     = var.breaker_failure_rate_threshold > 0 && var.breaker_failure_rate_threshold <= 1
    error_message = "breaker_failure_rate_threshold must be in (0, 1]."
  }
}

variable "breaker_minimum_calls" {
  description = "BREAKER_MINIMUM_CALLS: calls in the window before the failure rate counts."
  type        = number
  default     = 3

  validation {
    condition     = var.breaker_minimum_calls >= 1 && floor(var.breaker_minimum_calls) == var.breaker_minimum_calls
    error_message = "breaker_minimum_calls must be a whole number >= 1."
  }
}

variable "breaker_window_s" {
  description = "BREAKER_WINDOW_S: seconds after which a call no longer counts."
  type        = number
  default     = 5

  validation {
    condition     = var.breaker_window_s > 0
    error_message = "breaker_window_s must be positive."
  }
}

variable "breaker_open_s" {
  description = "BREAKER_OPEN_S: seconds a breaker stays open before a trial call."
  type        = number
  default     = 30

  validation {
    condition     = var.breaker_open_s > 0
    error_message = "breaker_open_s must be positive."
  }
}

variable "breaker_half_open_max_calls" {
  description = "BREAKER_HALF_OPEN_MAX_CALLS: trial calls allowed at once while half-open."
  type        = number
  default     = 1

  validation {
    condition     = var.breaker_half_open_max_calls >= 1 && floor(var.breaker_half_open_max_calls) == var.breaker_half_open_max_calls
    error_message = "breaker_half_open_max_calls must be a whole number >= 1."
  }
}

variable "log_level" {
  description = "LOG_LEVEL of the proxy."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

# --- The mock providers' faults ---------------------------------------------------------------

variable "mtn_failure_rate" {
  description = "MOCK_FAILURE_RATE of the MTN mock: share of payments answered 500."
  type        = number
  default     = 0.2

  validation {
    condition     = var.mtn_failure_rate >= 0 && var.mtn_failure_rate <= 1
    error_message = "mtn_failure_rate must be between 0 and 1."
  }
}

variable "airtel_failure_rate" {
  description = "MOCK_FAILURE_RATE of the Airtel mock: share of payments answered 500."
  type        = number
  default     = 0.2

  validation {
    condition     = var.airtel_failure_rate >= 0 && var.airtel_failure_rate <= 1
    error_message = "airtel_failure_rate must be between 0 and 1."
  }
}

variable "mock_decline_rate" {
  description = "MOCK_DECLINE_RATE of both mocks: share of payments declined (a business answer, 402)."
  type        = number
  default     = 0

  validation {
    condition     = var.mock_decline_rate >= 0 && var.mock_decline_rate <= 1
    error_message = "mock_decline_rate must be between 0 and 1."
  }
}

variable "mock_hang_rate" {
  description = "MOCK_HANG_RATE of both mocks: share of payments charged but never answered (payagg answers 202 PENDING and reconciles)."
  type        = number
  default     = 0

  validation {
    condition     = var.mock_hang_rate >= 0 && var.mock_hang_rate <= 1
    error_message = "mock_hang_rate must be between 0 and 1."
  }
}

variable "mock_latency_ms" {
  description = "MOCK_LATENCY_MS of both mocks: [low, high] bounds of the simulated latency in ms."
  type        = list(number)
  default     = [20, 120]

  validation {
    condition     = length(var.mock_latency_ms) == 2 && var.mock_latency_ms[0] >= 0 && var.mock_latency_ms[0] <= var.mock_latency_ms[1]
    error_message = "mock_latency_ms must be [low, high] with 0 <= low <= high."
  }
}

variable "mock_seed" {
  description = "MOCK_SEED of both mocks, for reproducible faults; null leaves them unseeded."
  type        = number
  default     = null
}

variable "mock_approval_ms" {
  description = "MOCK_APPROVAL_MS of both mocks: [low, high] ms before the simulated payer approves ([0, 0]: at once)."
  type        = list(number)
  default     = [0, 0]

  validation {
    condition     = length(var.mock_approval_ms) == 2 && var.mock_approval_ms[0] >= 0 && var.mock_approval_ms[0] <= var.mock_approval_ms[1]
    error_message = "mock_approval_ms must be [low, high] with 0 <= low <= high."
  }
}

variable "mock_abandon_rate" {
  description = "MOCK_ABANDON_RATE of both mocks: share of payers who never approve (the payment expires)."
  type        = number
  default     = 0

  validation {
    condition     = var.mock_abandon_rate >= 0 && var.mock_abandon_rate <= 1
    error_message = "mock_abandon_rate must be between 0 and 1."
  }
}

variable "mock_approval_timeout_s" {
  description = "MOCK_APPROVAL_TIMEOUT_S of both mocks: seconds before an unapproved payment expires; null keeps each provider's own."
  type        = number
  default     = null

  validation {
    condition     = var.mock_approval_timeout_s == null || try(var.mock_approval_timeout_s > 0, false)
    error_message = "mock_approval_timeout_s must be null or > 0."
  }
}

variable "mock_status_failure_rate" {
  description = "MOCK_STATUS_FAILURE_RATE of both mocks: share of status queries answered 500."
  type        = number
  default     = 0

  validation {
    condition     = var.mock_status_failure_rate >= 0 && var.mock_status_failure_rate <= 1
    error_message = "mock_status_failure_rate must be between 0 and 1."
  }
}

variable "mock_sync_declines" {
  description = "MOCK_SYNC_DECLINES of both mocks: answer declines on the payment request itself (MTN: a 500 naming the reason)."
  type        = bool
  default     = false
}

variable "mock_token_ttl_s" {
  description = "MOCK_TOKEN_TTL_S of both mocks: access token lifetime in seconds; null keeps each provider's real one."
  type        = number
  default     = null

  validation {
    condition     = var.mock_token_ttl_s == null || try(var.mock_token_ttl_s > 0, false)
    error_message = "mock_token_ttl_s must be null or > 0."
  }
}

# --- Clients of the payment API (terraform/clients.tf) ----------------------------------------

variable "merchant_key_sha256" {
  description = "SHA-256 (64 lowercase hex) of each API key of the `merchant` client; two while a key is rotated. Generate a key and its hash as the README's Security section shows; the key itself never goes into Terraform."
  type        = list(string)

  validation {
    condition     = length(var.merchant_key_sha256) >= 1 && length(var.merchant_key_sha256) <= 2 && alltrue([for hash in var.merchant_key_sha256 : can(regex("^[0-9a-f]{64}$", hash))])
    error_message = "merchant_key_sha256 must hold one or two SHA-256 hashes (64 lowercase hex digits), never a key."
  }
}

variable "merchant_rate_per_s" {
  description = "PAYAGG_MERCHANT_RATE_PER_S: POST /v1/pay per second the merchant may send on average, across every task (429 above it)."
  type        = number
  default     = 50

  validation {
    condition     = var.merchant_rate_per_s > 0 && var.merchant_rate_per_s <= 100000
    error_message = "merchant_rate_per_s must be in (0, 100000]."
  }
}

variable "merchant_burst" {
  description = "PAYAGG_MERCHANT_BURST: requests the merchant may send at once above its rate."
  type        = number
  default     = 100

  validation {
    condition     = var.merchant_burst >= 1 && floor(var.merchant_burst) == var.merchant_burst
    error_message = "merchant_burst must be a whole number >= 1."
  }
}
