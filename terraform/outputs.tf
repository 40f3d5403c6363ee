output "alb_dns_name" {
  description = "Public DNS name of the load balancer."
  value       = aws_lb.payagg.dns_name
}

output "pay_url" {
  description = "The proxy's POST /v1/pay endpoint behind the load balancer."
  value       = "${local.https_enabled ? "https" : "http"}://${aws_lb.payagg.dns_name}/v1/pay"
}

output "ecr_repository_url" {
  description = "Push the payagg image here (docker tag / docker push)."
  value       = aws_ecr_repository.payagg.repository_url
}

output "log_group_name" {
  description = "CloudWatch log group of the three containers (stream prefixes proxy/, mtn/, airtel/)."
  value       = aws_cloudwatch_log_group.payagg.name
}

output "ecs_cluster_name" {
  description = "ECS cluster running the service."
  value       = aws_ecs_cluster.payagg.name
}

output "ecs_service_name" {
  description = "ECS service of the payagg task."
  value       = aws_ecs_service.payagg.name
}

output "store_endpoint" {
  description = "Host of the store of record: the MemoryDB cluster endpoint or the ElastiCache primary (port 6379, TLS)."
  value       = local.redis_host
}

output "redis_mode" {
  description = "REDIS_MODE the proxy gets: cluster (MemoryDB) or standalone (ElastiCache)."
  value       = local.redis_mode
}

output "public_url" {
  description = "PAYAGG_PUBLIC_URL: where providers reach payagg; the base of the callback URLs."
  value       = local.public_url

  precondition {
    condition     = var.certificate_arn == "" || startswith(coalesce(var.public_url, "http://"), "https://")
    error_message = "With certificate_arn set, set public_url to https://<the certificate's domain>: the ALB's own name fails TLS verification, and HTTP only redirects."
  }
}
