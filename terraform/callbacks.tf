# Provider callbacks on Fargate. The proxy's `server.public_url` is the load balancer's public
# address, so the mocks in each task call back the way real providers would: through the ALB, from
# the outside. MTN's mock calls the X-Callback-Url the proxy sends with each payment; Airtel's calls
# payagg's static Airtel URL, the one an operator registers on a real Airtel merchant account. The
# ALB's DNS name resolves to public addresses, so the calls leave through the NAT gateway and reach
# the ALB from its public IP(s); they may land on any task, which is fine: a callback only makes the
# payment due for a status query in the shared store.

locals {
  # var.public_url, else the ALB's own name over HTTP (a certificate needs the domain it names:
  # the public_url output refuses a certificate without a public_url).
  public_url = var.public_url != null ? trimsuffix(var.public_url, "/") : "http://${aws_lb.payagg.dns_name}"

  # The port the callbacks reach the ALB on; known at plan time (the ALB's name is not).
  callback_port = startswith(coalesce(var.public_url, "http://"), "https://") ? 443 : 80

  # Airtel's static callback URL is public_url + /v1/callbacks/AIRTEL/<token>, where the token is
  # an HMAC-SHA256 under the callback secret, which Terraform cannot compute. The Airtel container
  # computes it when it starts, with the proxy's own function (the image holds both packages), and
  # then becomes the mock: ECS runs `python -c <this> payagg-mock --provider airtel ...`.
  airtel_mock_launcher = <<-EOT
    import os
    import sys

    from proxy.providers.callbacks import CallbackTarget

    public_url = os.environ["PAYAGG_PUBLIC_URL"].rstrip("/")
    target = CallbackTarget(public_url, os.environ["PAYAGG_CALLBACK_SECRET"])
    os.environ["MOCK_CALLBACK_URL"] = target.static_url_for("AIRTEL")
    os.execvp(sys.argv[1], sys.argv[1:])
  EOT
}

# HTTPS egress is open already (service_https); plain HTTP only when the callbacks use it.
resource "aws_vpc_security_group_egress_rule" "service_callbacks_http" {
  #checkov:skip=CKV_AWS_382:port 80 only, for the mocks' callbacks to the ALB's public address, which has no fixed IP to name
  count = local.callback_port == 80 ? 1 : 0

  security_group_id = aws_security_group.service.id
  description       = "Mock callbacks to the ALB public address (HTTP public_url)"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = "0.0.0.0/0"
}

# The callbacks arrive from the NAT gateways' addresses: admitted on their own when
# alb_ingress_cidrs is narrowed (the default, the whole internet, admits them already).
resource "aws_vpc_security_group_ingress_rule" "alb_callbacks_from_nat" {
  count = contains(var.alb_ingress_cidrs, "0.0.0.0/0") ? 0 : (var.single_nat_gateway ? 1 : length(local.azs))

  security_group_id = aws_security_group.alb.id
  description       = "Mock callbacks from NAT gateway ${count.index}"
  ip_protocol       = "tcp"
  from_port         = local.callback_port
  to_port           = local.callback_port
  cidr_ipv4         = "${module.vpc.nat_public_ips[count.index]}/32"
}
