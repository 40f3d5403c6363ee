# Two AZs: public subnets hold the ALB and the NAT gateway, private subnets hold the tasks and Redis.
#
# NAT rather than interface endpoints: the task needs ECR (api + dkr), CloudWatch Logs and Secrets
# Manager, i.e. four interface endpoints per AZ (about 8 x $7/month) against one NAT gateway (about
# $32/month plus traffic), and a gateway with real providers instead of the mocks needs a route to the
# internet anyway. The free S3 gateway endpoint keeps image layer downloads off the NAT's meter.

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:only the first two zone names (sorted) are used, so a zone AWS adds later changes nothing
  state = "available"
}

locals {
  azs = slice(data.aws_availability_zones.available.names, 0, 2)
}

module "vpc" {
  #checkov:skip=CKV_TF_1:a registry module pinned to an exact version; registry releases are immutable
  source  = "terraform-aws-modules/vpc/aws"
  version = "5.21.0"

  name = var.name
  cidr = var.vpc_cidr
  azs  = local.azs

  public_subnets  = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, i)]
  private_subnets = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, i + 10)]

  enable_nat_gateway   = true
  single_nat_gateway   = var.single_nat_gateway
  enable_dns_hostnames = true
  enable_dns_support   = true

  # The module's default security group is emptied so nothing can fall back on it.
  manage_default_security_group  = true
  default_security_group_ingress = []
  default_security_group_egress  = []

  enable_flow_log                                 = var.enable_vpc_flow_logs
  create_flow_log_cloudwatch_log_group            = var.enable_vpc_flow_logs
  create_flow_log_cloudwatch_iam_role             = var.enable_vpc_flow_logs
  flow_log_cloudwatch_log_group_retention_in_days = var.log_retention_days
  flow_log_cloudwatch_log_group_kms_key_id        = aws_kms_key.payagg.arn
}

resource "aws_vpc_endpoint" "s3" {
  vpc_id            = module.vpc.vpc_id
  service_name      = "com.amazonaws.${data.aws_region.current.name}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = module.vpc.private_route_table_ids

  tags = { Name = "${var.name}-s3" }
}
