# fmsflow on AWS: one console node (i1: Kafka with two brokers, the collector, Prometheus,
# Grafana) and the engine nodes s1..s3 (one timely process each, one cluster), the Parquet
# lake bucket and a least-privilege instance role. Ansible (../ansible) configures the nodes
# from the `ansible_inventory` output; see outputs.tf.

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      project = "fmsflow"
    }
  }
}
