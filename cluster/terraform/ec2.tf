# i1: the console node. s1..sN: the engine nodes, one timely process each; the process index
# of sK is K-1 (its position in the inventory's engine group).

data "aws_ami" "debian12" {
  count = var.ami_id == null ? 1 : 0

  most_recent = true
  owners      = ["136693071363"] # Debian's official AWS account

  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }

  filter {
    name   = "root-device-type"
    values = ["ebs"]
  }
}

locals {
  ami_id       = var.ami_id != null ? var.ami_id : data.aws_ami.debian12[0].id
  engine_nodes = { for i in range(var.engine_count) : "s${i + 1}" => i }
}

resource "aws_instance" "console" {
  # checkov:skip=CKV2_AWS_41: least privilege: Kafka, the collector, Prometheus and Grafana on i1 call no AWS API, so i1 gets no role
  ami                    = local.ami_id
  instance_type          = var.console_instance_type
  key_name               = var.key_name
  subnet_id              = aws_subnet.nodes.id
  vpc_security_group_ids = [aws_security_group.console.id]
  monitoring             = true
  ebs_optimized          = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.console_volume_size
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name = "i1"
    Role = "console"
  }

  volume_tags = {
    Name = "i1"
  }

  lifecycle {
    # A newer Debian image must not replace a running node; re-create it on purpose instead.
    ignore_changes = [ami]
  }
}

resource "aws_instance" "engine" {
  for_each = local.engine_nodes

  ami                    = local.ami_id
  instance_type          = var.engine_instance_type
  key_name               = var.key_name
  subnet_id              = aws_subnet.nodes.id
  vpc_security_group_ids = [aws_security_group.engine.id]
  iam_instance_profile   = aws_iam_instance_profile.engine.name
  monitoring             = true
  ebs_optimized          = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.engine_volume_size
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name = each.key
    Role = "engine"
  }

  volume_tags = {
    Name = each.key
  }

  lifecycle {
    ignore_changes = [ami]
  }
}

# Elastic IPs: the nodes keep their public addresses (and the Ansible inventory stays right)
# across a stop and start.
resource "aws_eip" "console" {
  domain   = "vpc"
  instance = aws_instance.console.id

  tags = {
    Name = "i1"
  }

  depends_on = [aws_internet_gateway.main]
}

resource "aws_eip" "engine" {
  for_each = aws_instance.engine

  domain   = "vpc"
  instance = each.value.id

  tags = {
    Name = each.key
  }

  depends_on = [aws_internet_gateway.main]
}
