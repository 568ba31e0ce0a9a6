# Two security groups, one per role, and nothing open that the deployment does not use:
#
#   from \ to        i1 (console)                            s-nodes (engine)
#   admin_cidr       22 SSH, Grafana, Prometheus              22 SSH, query API/dashboard
#   i1               Kafka brokers + controller (itself)      query API /metrics, node
#                                                             exporter (Prometheus scrapes)
#   s-nodes          Kafka brokers                            timely, query API (api.peers)
#
# i1 reaching its own private IP (Prometheus scraping its node exporter, collector and JMX
# exporters; one broker talking to the other) stays inside the kernel and never meets a
# security group. The Kafka rules from i1 itself state who uses Kafka; they start to matter
# if a broker ever moves to another node of the console group.
#
# Outbound: the rules mirroring the above, HTTP/HTTPS to anywhere (Debian mirrors, the S3
# lake, AWS APIs, Grafana plugins) and, on i1 only, the FMS API port.

locals {
  kafka_broker_ports = { for p in var.kafka_broker_ports : tostring(p) => p }
  # 80 and 443 are open outbound to anywhere already; a second identical rule would clash.
  fms_api_rule = contains([80, 443], var.fms_api_port) ? {} : { fms = var.fms_api_port }
}

resource "aws_security_group" "console" {
  name        = "${var.name_prefix}-console"
  description = "i1: Kafka brokers, collector, Prometheus, Grafana"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-console"
  }
}

resource "aws_security_group" "engine" {
  name        = "${var.name_prefix}-engine"
  description = "s-nodes: fmsflow engine processes of one timely cluster"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-engine"
  }
}

# ---------------------------------------------------------------------------------------
# i1 (console) inbound
# ---------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "console_ssh_admin" {
  security_group_id = aws_security_group.console.id
  description       = "SSH (Ansible, operators) from the admin network"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_ingress_rule" "console_grafana_admin" {
  security_group_id = aws_security_group.console.id
  description       = "Grafana from the admin network"
  ip_protocol       = "tcp"
  from_port         = var.grafana_port
  to_port           = var.grafana_port
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_ingress_rule" "console_prometheus_admin" {
  security_group_id = aws_security_group.console.id
  description       = "Prometheus UI/API from the admin network"
  ip_protocol       = "tcp"
  from_port         = var.prometheus_port
  to_port           = var.prometheus_port
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_ingress_rule" "console_kafka_from_engine" {
  for_each = local.kafka_broker_ports

  security_group_id            = aws_security_group.console.id
  description                  = "Kafka broker ${each.key} from the engine nodes"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.engine.id
}

resource "aws_vpc_security_group_ingress_rule" "console_kafka_from_self" {
  for_each = local.kafka_broker_ports

  security_group_id            = aws_security_group.console.id
  description                  = "Kafka broker ${each.key} from i1 (other broker, collector)"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.console.id
}

resource "aws_vpc_security_group_ingress_rule" "console_kafka_controller_self" {
  security_group_id            = aws_security_group.console.id
  description                  = "KRaft controller from the brokers on i1"
  ip_protocol                  = "tcp"
  from_port                    = var.kafka_controller_port
  to_port                      = var.kafka_controller_port
  referenced_security_group_id = aws_security_group.console.id
}

# ---------------------------------------------------------------------------------------
# i1 (console) outbound
# ---------------------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "console_https" {
  security_group_id = aws_security_group.console.id
  description       = "HTTPS to package mirrors, AWS APIs and the FMS API"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "console_http" {
  security_group_id = aws_security_group.console.id
  description       = "HTTP to the Debian package mirrors and the FMS API"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "console_fms_api" {
  for_each = local.fms_api_rule

  security_group_id = aws_security_group.console.id
  description       = "Collector polls the FMS API"
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_ipv4         = var.fms_api_cidr
}

resource "aws_vpc_security_group_egress_rule" "console_kafka_self" {
  for_each = local.kafka_broker_ports

  security_group_id            = aws_security_group.console.id
  description                  = "Kafka broker ${each.key} on i1 (other broker, collector)"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.console.id
}

resource "aws_vpc_security_group_egress_rule" "console_kafka_controller_self" {
  security_group_id            = aws_security_group.console.id
  description                  = "Brokers on i1 to the KRaft controller on i1"
  ip_protocol                  = "tcp"
  from_port                    = var.kafka_controller_port
  to_port                      = var.kafka_controller_port
  referenced_security_group_id = aws_security_group.console.id
}

resource "aws_vpc_security_group_egress_rule" "console_engine_api" {
  security_group_id            = aws_security_group.console.id
  description                  = "Prometheus scrapes the engine /metrics (query API port)"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.engine.id
}

resource "aws_vpc_security_group_egress_rule" "console_engine_node_exporter" {
  security_group_id            = aws_security_group.console.id
  description                  = "Prometheus scrapes the node exporter of the engine nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.node_exporter_port
  to_port                      = var.node_exporter_port
  referenced_security_group_id = aws_security_group.engine.id
}

# ---------------------------------------------------------------------------------------
# s-nodes (engine) inbound
# ---------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "engine_ssh_admin" {
  security_group_id = aws_security_group.engine.id
  description       = "SSH (Ansible, operators) from the admin network"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_ingress_rule" "engine_api_admin" {
  security_group_id = aws_security_group.engine.id
  description       = "Query API and dashboard from the admin network"
  ip_protocol       = "tcp"
  from_port         = var.api_port
  to_port           = var.api_port
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_ingress_rule" "engine_api_console" {
  security_group_id            = aws_security_group.engine.id
  description                  = "Engine /metrics scraped by Prometheus on i1"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.console.id
}

resource "aws_vpc_security_group_ingress_rule" "engine_api_peers" {
  security_group_id            = aws_security_group.engine.id
  description                  = "Query API between engine processes (api.peers)"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.engine.id
}

resource "aws_vpc_security_group_ingress_rule" "engine_timely" {
  security_group_id            = aws_security_group.engine.id
  description                  = "Timely cluster connections between engine processes"
  ip_protocol                  = "tcp"
  from_port                    = var.timely_port
  to_port                      = var.timely_port
  referenced_security_group_id = aws_security_group.engine.id
}

resource "aws_vpc_security_group_ingress_rule" "engine_node_exporter_console" {
  security_group_id            = aws_security_group.engine.id
  description                  = "Node exporter scraped by Prometheus on i1"
  ip_protocol                  = "tcp"
  from_port                    = var.node_exporter_port
  to_port                      = var.node_exporter_port
  referenced_security_group_id = aws_security_group.console.id
}

# ---------------------------------------------------------------------------------------
# s-nodes (engine) outbound
# ---------------------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "engine_https" {
  security_group_id = aws_security_group.engine.id
  description       = "HTTPS to the S3 lake, AWS APIs and package mirrors"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "engine_http" {
  security_group_id = aws_security_group.engine.id
  description       = "HTTP to the Debian package mirrors"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "engine_kafka" {
  for_each = local.kafka_broker_ports

  security_group_id            = aws_security_group.engine.id
  description                  = "Kafka broker ${each.key} on i1"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.console.id
}

resource "aws_vpc_security_group_egress_rule" "engine_timely" {
  security_group_id            = aws_security_group.engine.id
  description                  = "Timely cluster connections to the other engine processes"
  ip_protocol                  = "tcp"
  from_port                    = var.timely_port
  to_port                      = var.timely_port
  referenced_security_group_id = aws_security_group.engine.id
}

resource "aws_vpc_security_group_egress_rule" "engine_api_peers" {
  security_group_id            = aws_security_group.engine.id
  description                  = "Query API of the other engine processes (api.peers)"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.engine.id
}
