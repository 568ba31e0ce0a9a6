# Write the Ansible inventory after `terraform apply`:
#
#   terraform output -raw ansible_inventory > ../ansible/inventory/aws.yml
#
# The engine group lists s1, s2, s3 in that order; a host's position in it is the index of
# its engine process (--process), and the private IPs in that order make --cluster.

locals {
  console_host = {
    ansible_host = aws_eip.console.public_ip
    private_ip   = aws_instance.console.private_ip
  }

  # yamlencode writes map keys sorted, so s1 < s2 < ... < s9 keeps the process order
  # (engine_count is at most 9, see variables.tf).
  engine_hosts = {
    for name, node in aws_instance.engine : name => {
      ansible_host = aws_eip.engine[name].public_ip
      private_ip   = node.private_ip
    }
  }

  lake_url = "s3://${aws_s3_bucket.lake.bucket}/${var.lake_prefix}"

  kafka_brokers = join(",", [for p in var.kafka_broker_ports : "${aws_instance.console.private_ip}:${p}"])

  ansible_inventory = {
    all = {
      vars = {
        ansible_user          = "admin" # the login user of Debian's images
        fmsflow_lake_url      = local.lake_url
        fmsflow_kafka_brokers = local.kafka_brokers
      }
      children = {
        console    = { hosts = { i1 = local.console_host } }
        kafka      = { hosts = { i1 = local.console_host } }
        collector  = { hosts = { i1 = local.console_host } }
        monitoring = { hosts = { i1 = local.console_host } }
        engine     = { hosts = local.engine_hosts }
      }
    }
  }
}

output "public_ips" {
  description = "Public (elastic) IP of every node, by name."
  value = merge(
    { i1 = aws_eip.console.public_ip },
    { for name, eip in aws_eip.engine : name => eip.public_ip },
  )
}

output "private_ips" {
  description = "Private IP of every node, by name."
  value = merge(
    { i1 = aws_instance.console.private_ip },
    { for name, node in aws_instance.engine : name => node.private_ip },
  )
}

output "lake_bucket" {
  description = "Name of the lake bucket."
  value       = aws_s3_bucket.lake.bucket
}

output "lake_url" {
  description = "The engine's lake.url."
  value       = local.lake_url
}

output "lake_kms_key_arn" {
  description = "KMS key that encrypts the lake bucket."
  value       = aws_kms_key.lake.arn
}

output "kafka_brokers" {
  description = "Kafka bootstrap servers (i1's private IP), for kafka.brokers."
  value       = local.kafka_brokers
}

output "ansible_inventory" {
  description = "Ansible inventory (YAML): terraform output -raw ansible_inventory > ../ansible/inventory/aws.yml"
  value       = yamlencode(local.ansible_inventory)
}
