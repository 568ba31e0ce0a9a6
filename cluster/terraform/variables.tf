# ---------------------------------------------------------------------------------------
# Where and what
# ---------------------------------------------------------------------------------------

variable "region" {
  description = "AWS region for every resource."
  type        = string
  default     = "eu-central-1"
}

variable "name_prefix" {
  description = "Prefix of resource names (VPC, security groups, role, keys, log group)."
  type        = string
  default     = "fmsflow"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name_prefix))
    error_message = "name_prefix: 2-31 characters, lower-case letters, digits and '-', starting with a letter."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be an IPv4 CIDR block, e.g. 10.42.0.0/16."
  }
}

variable "subnet_cidr" {
  description = "CIDR block of the nodes' subnet (inside vpc_cidr)."
  type        = string
  default     = "10.42.1.0/24"

  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0))
    error_message = "subnet_cidr must be an IPv4 CIDR block, e.g. 10.42.1.0/24."
  }
}

variable "availability_zone" {
  description = "Availability zone of the subnet (and so of every node); null lets AWS choose."
  type        = string
  default     = null
}

variable "admin_cidr" {
  description = "The only network SSH, the engine's query API/dashboard, Grafana and Prometheus can be reached from (e.g. your office's address/32)."
  type        = string
  # No default on purpose: the operator must say where the cluster is administered from.

  validation {
    # An IPv4 network address with its prefix length (203.0.113.7/32, 198.51.100.0/24), and
    # never 0.0.0.0/0 or any other /0: that would be the whole internet.
    condition = alltrue([
      try(cidrsubnet(var.admin_cidr, 0, 0) == var.admin_cidr, false),
      can(regex("^[0-9.]+/[0-9]+$", var.admin_cidr)),
      try(tonumber(split("/", var.admin_cidr)[1]) > 0, false),
    ])
    error_message = "admin_cidr must be an IPv4 network in CIDR form such as 203.0.113.7/32 or 198.51.100.0/24, and not 0.0.0.0/0 (the whole internet)."
  }
}

# ---------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------

variable "console_instance_type" {
  description = "Instance type of i1 (Kafka with two brokers, the collector, Prometheus, Grafana)."
  type        = string
  default     = "t3.large"
}

variable "engine_instance_type" {
  description = "Instance type of the engine nodes s1..sN (one timely process each)."
  type        = string
  default     = "c6i.xlarge"
}

variable "engine_count" {
  description = "Number of engine nodes (s1..sN), i.e. processes of the timely cluster."
  type        = number
  default     = 3

  validation {
    # At most 9: the inventory lists the engine hosts sorted by name, and their order is the
    # process index, so s10 would sort before s2.
    condition     = var.engine_count >= 1 && var.engine_count <= 9 && floor(var.engine_count) == var.engine_count
    error_message = "engine_count must be a whole number from 1 to 9."
  }
}

variable "ami_id" {
  description = "AMI for every node; null uses the newest official Debian 12 (bookworm) amd64 image."
  type        = string
  default     = null
}

variable "key_name" {
  description = "Name of an existing EC2 key pair in the region; its key logs in as user 'admin' (Debian)."
  type        = string
}

variable "console_volume_size" {
  description = "Root volume of i1 in GiB (holds the Kafka logs and Prometheus data)."
  type        = number
  default     = 100
}

variable "engine_volume_size" {
  description = "Root volume of each engine node in GiB."
  type        = number
  default     = 30
}

# ---------------------------------------------------------------------------------------
# Lake
# ---------------------------------------------------------------------------------------

variable "lake_bucket_name" {
  description = "Name of the S3 bucket of the Parquet lake (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.lake_bucket_name))
    error_message = "lake_bucket_name must be a valid S3 bucket name: 3-63 lower-case letters, digits, '.' and '-'."
  }
}

variable "lake_prefix" {
  description = "Key prefix of the lake inside the bucket; the engine's lake url is s3://<bucket>/<prefix>."
  type        = string
  default     = "lake/"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._/-]*/$", var.lake_prefix))
    error_message = "lake_prefix must not start with '/' and must end with '/', e.g. \"lake/\"."
  }
}

variable "lake_ia_after_days" {
  description = "Lake objects move to STANDARD_IA this many days after creation."
  type        = number
  default     = 30

  validation {
    condition     = var.lake_ia_after_days >= 30
    error_message = "S3 moves objects to STANDARD_IA 30 days after creation at the earliest."
  }
}

variable "lake_glacier_ir_after_days" {
  description = "Lake objects move to GLACIER_IR (instant retrieval) this many days after creation."
  type        = number
  default     = 90
}

variable "lake_noncurrent_expire_days" {
  description = "Replaced or deleted lake object versions are removed this many days after they stop being current."
  type        = number
  default     = 30
}

variable "flow_log_retention_days" {
  description = "Days the VPC flow logs are kept in CloudWatch Logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be a CloudWatch Logs retention of at least one year (365, 400, 545, 731, ...)."
  }
}

# ---------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------

variable "timely_port" {
  description = "Port the engine processes connect to each other on (--cluster host:port)."
  type        = number
  default     = 2101
}

variable "api_port" {
  description = "Port of the engine's query API and dashboard; it also serves /metrics."
  type        = number
  default     = 8091
}

variable "kafka_broker_ports" {
  description = "Client ports of the two Kafka brokers on i1."
  type        = list(number)
  default     = [9092, 9093]
}

variable "kafka_controller_port" {
  description = "Port of the KRaft controller on i1 (only the brokers on i1 talk to it)."
  type        = number
  default     = 9094
}

variable "node_exporter_port" {
  description = "Port of the Prometheus node exporter on every node."
  type        = number
  default     = 9100
}

variable "prometheus_port" {
  description = "Port of Prometheus on i1."
  type        = number
  default     = 9090
}

variable "grafana_port" {
  description = "Port of Grafana on i1."
  type        = number
  default     = 3000
}

variable "fms_api_port" {
  description = "Port of the FMS API that the collector on i1 polls (80 and 443 are open outbound anyway)."
  type        = number
  default     = 8080
}

variable "fms_api_cidr" {
  description = "Where the FMS API is; only i1 (the collector) may reach it on fms_api_port."
  type        = string
  default     = "0.0.0.0/0"

  validation {
    condition     = can(cidrhost(var.fms_api_cidr, 0))
    error_message = "fms_api_cidr must be an IPv4 CIDR block."
  }
}
