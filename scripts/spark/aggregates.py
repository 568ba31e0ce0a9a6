#!/usr/bin/env python3
"""The PySpark Structured Streaming baseline of fmsflow: the same validation and the same
per-device, per-hour aggregates as `fmsflow run`, over the same input, written as Parquet.

Usage (after `eval "$(scripts/spark/setup.sh)"`, which installs pyspark and the Kafka jars):

    "$FMSFLOW_SPARK_PYTHON" scripts/spark/aggregates.py \\
        --source files:/tmp/in.ndjson --out /tmp/spark-out --cores 2 --fleet-size 100
    "$FMSFLOW_SPARK_PYTHON" scripts/spark/aggregates.py \\
        --source kafka:127.0.0.1:19092/fms.raw --out /tmp/spark-out --cores 2

Input, as fmsflow reads it:
  files:GLOB_OR_DIR   NDJSON in fmsflow's replay format: per line `<ingest_ms> <payload>`
                      (1 to 18 digits, one space), or a bare payload without an ingest time.
  kafka:BOOTSTRAP/TOPIC
                      the raw topic, from its earliest offsets to the end it has when the
                      query starts: the message value is the payload, the message timestamp
                      the ingest time (`fmsflow collect` stamps each record with its poll time;
                      fmsflow's Kafka reader takes the record timestamp as the ingest time).

Output in --out (emptied first):
  hourly/dt=YYYY-MM-DD/hour=HH/*.parquet    per (device, event hour): the columns of the lake's
                                            `hourly` table (docs/LAKE.md), same names and types
                                            (timestamps INT64 millis UTC; Spark writes every
                                            column as optional, the lake as required)
  quality/dt=YYYY-MM-DD/hour=HH/*.parquet   per (device, hour, outcome): device, outcome, count
                                            as in the lake's `quality` table, and hour_start
                                            (see "Quality counts" below)
  report.json                               the JSON line printed at the end, and per batch its
                                            phases (ms) and state operators (rows, memory)

The last line on stdout is one JSON object: records read, valid, rejected per rule, hourly and
quality rows written, the query's wall seconds (start to end of the streaming query), the
finishing step's seconds, and the session start-up seconds (JVM and SparkSession), apart.

How it works: one streaming query (`readStream`, `trigger(availableNow=True)`: it takes what
the input has when it starts, then stops):

  source -> validation (stateless rules, Spark SQL expressions) -> observe (counts)
         -> withWatermark -> dropDuplicates (the `duplicate` rule)
         -> groupBy(device, hour, outcome): count, fail_count, first/last time, and per metric
            min, max, avg, stddev_pop -> update output mode
         -> foreachBatch: write the updated groups as Parquet (hourly: the `valid` groups)

Rejected records go through the same dedup and aggregation, each with a key of its own (Kafka
partition and offset; for files a uuid(), as the text source has no line number and
monotonically_increasing_id() is refused in streaming): one pass over the input, one state
entry per rejection. For readings, dropDuplicates keeps the first row it meets of a (device,
event time); within a batch that is the input's order in practice, though Spark does not
promise it. Duplicates in `fmsflow gen`'s data are byte-identical, so which copy wins does not
change any aggregate.

Final windows. In append mode an aggregate is written only once the watermark passes its
window's end, and the watermark moves only with newer data: at the end of a bounded input the
last hours are never written. This job uses **update mode**: each micro-batch hands
foreachBatch every group it changed, with the group's full current value, so nothing waits for
the watermark, and nothing is recomputed: a group is written once per batch that changed it.
Over one batch (what availableNow makes of the input unless --max-per-trigger sets
maxFilesPerTrigger or maxOffsetsPerTrigger) every group is written exactly once, and the
batch's folder simply becomes the output (a rename). Over several batches the finishing step
keeps each group's row from the latest batch that wrote it (fmsflow's "new version of an
hour"), a small Spark job over the aggregates only. The alternatives cost more or are wrong:
complete mode rewrites every group in every batch; an end-of-input marker to push the
watermark would be read in the first batch of a multi-batch run and make every later row late.
The watermark (max_age + max_future + 1 h behind the newest event hour) only bounds the state,
as fmsflow's dedup and sealing forget old hours; in a one-batch run it drops nothing. Spark's
first watermark is 0, which would drop rows at or before 1970-01-01T00 (records without any
time are counted in hour 0): those rows get no watermark time (NULL, never late).

The rules, in fmsflow's order (dataflows/src/rules.rs): a payload that is not a JSON object
(malformed_json if it is not JSON at all, wrong_type if it is JSON of another kind), that does
not decode (malformed_json on a syntax error, wrong_type when a field has the wrong JSON type,
non_finite when a metric does not fit a double, e.g. 1e999), missing_field (absent or null:
DeviceId, time, the metrics, isFail), unknown_device (not in 1..=fleet size), bad_time (not RFC
3339 as fmsflow's strict parser reads it), future_time / stale_time (only with an ingest time),
out_of_range (inclusive ranges, metric order), then duplicate: a second reading of the same
(device, event time); the first one is accepted.

Known differences, on inputs `fmsflow gen` never makes: serde_json reports the *first* error in
document order, this job classifies by kind (a syntax error after a mistyped field is
malformed_json here, wrong_type there; a `1e999` metric before another decode error is
non_finite there; a non-string `time` is wrong_type there even if a field is also missing, here
only when no earlier rule applies); a repeated key is wrong_type there, here the last one wins;
trailing text after the object is caught here only when the payload does not end with `}`
(`{...}}` passes); lone surrogate escapes (`"\\ud800"`) and invalid UTF-8 are malformed there,
replaced by U+FFFD here; a key spelled with escapes (`"\\u0074ime"`) counts as `time` in both,
but the check that `time` is a JSON string (bad_time vs wrong_type) looks for the plain key;
a replay line is split on `\\r` as well as `\\n` here (fmsflow splits on `\\n` only and strips
trailing `\\r`).

Quality counts: one row per (device, hour, outcome) like the lake's `quality` table (device 0
where fmsflow writes 0; `valid` in the event hour, rejections in the ingest hour, else the event
hour, else hour 0) for every outcome but `duplicate`. Spark's dropDuplicates drops a duplicate
without a trace, so duplicates are counted over the whole run: readings that passed every
stateless rule (counted with `observe`, as the query runs) minus readings accepted. The
report's per-rule counts cover every rule. Counting duplicates per hour would take a second
pass over the input or a stateful operator of our own (Python, slow), which the benchmark
would then charge to Spark.

State: Spark's default state store (HDFSBackedStateStore, in the JVM heap; --driver-memory).
`--state-store rocksdb` is there for state larger than the heap; on 3.6 million readings it was
slower here (its eviction batch alone took half a minute).

Parallelism: `--cores N` runs `local[N]`. spark.sql.shuffle.partitions (also the number of
state store partitions) is 2*N: a few tasks per core absorb skew, while the default 200 would
spend most of the time on per-task and per-state-store overhead for this little state. A Kafka
source gets minPartitions=N so that every core reads even from a topic with fewer partitions
(fmsflow's workers read whole partitions). Files are split by Spark into at least N parts.
"""

import argparse
import glob
import json
import os
import shutil
import sys
import time

RULES = [
    "malformed_json", "missing_field", "wrong_type", "unknown_device", "bad_time",
    "future_time", "stale_time", "non_finite", "out_of_range", "duplicate",
]
METRICS = ["sensor1", "sensor2", "sensor3", "motor1", "motor2", "motor3"]
HOUR_MS = 3_600_000

# The payload as fmsflow's `Wire` reads it: typed fields, and Spark's corrupt-record column
# that is set when the payload is not JSON or a field has another JSON type.
TYPED_SCHEMA = ", ".join(
    ["time STRING", "DeviceId BIGINT"] + [f"{m} DOUBLE" for m in METRICS] + ["isFail BOOLEAN", "_corrupt STRING"])
# The same fields as text: a string field takes any JSON value, so only a syntax error is
# corrupt. Parsed only for payloads the typed parse refused, to tell malformed from mistyped.
TEXT_SCHEMA = ", ".join(
    ["time STRING", "DeviceId STRING"] + [f"{m} STRING" for m in METRICS] + ["isFail STRING", "_corrupt STRING"])
# Strict JSON, as serde_json reads it (Spark's defaults allow single quotes and NaN/Infinity).
JSON_OPTIONS = {
    "mode": "PERMISSIVE",
    "columnNameOfCorruptRecord": "_corrupt",
    "allowSingleQuotes": "false",
    "allowNonNumericNumbers": "false",
    "allowNumericLeadingZeros": "false",
    "allowUnquotedFieldNames": "false",
    "allowComments": "false",
    "allowBackslashEscapingAnyCharacter": "false",
    "allowUnquotedControlChars": "false",
}
# JSON's whitespace, as an SQL string literal.
WS = "' \\t\\n\\r'"
# fmsflow's RFC 3339 (dataflows/src/time.rs): fixed positions up to the seconds, an optional
# fraction of any length (milliseconds kept), `Z`/`z` or ±HH:MM, nothing after (\z, not $,
# which would allow a final newline).
RFC3339 = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})\\z"
# `time` given as a JSON string (else a non-string time is wrong_type, not bad_time).
TIME_IS_STRING = r'"time"[ \\t\\n\\r]*:[ \\t\\n\\r]*"'


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="aggregates.py",
        description="PySpark Structured Streaming baseline of fmsflow: fmsflow's validation rules and "
                    "per-device/per-hour aggregates over the same input, written as Parquet "
                    "(see the module docstring for the method and the known differences).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True,
                   help="files:GLOB_OR_DIR (replay lines `<ingest_ms> <payload>`) or kafka:BOOTSTRAP/TOPIC "
                        "(the raw topic, earliest to its end at start; ingest time = message timestamp)")
    p.add_argument("--out", required=True, help="output folder (emptied first): hourly/, quality/, report.json")
    p.add_argument("--cores", type=int, default=2, help="local[N]; shuffle/state partitions = 2*N")
    p.add_argument("--fleet-size", type=int, default=100, help="devices 1..=N are known (fleet.devices)")
    p.add_argument("--max-future-ms", type=int, default=5 * 60 * 1000,
                   help="largest allowed time - ingest (rules.max_future)")
    p.add_argument("--max-age-ms", type=int, default=6 * HOUR_MS, help="largest allowed ingest - time (rules.max_age)")
    for m in METRICS:
        hi = 250.0 if m.startswith("sensor") else 3000.0
        p.add_argument(f"--{m}-range", type=float, nargs=2, default=[0.0, hi], metavar=("MIN", "MAX"),
                       help=f"inclusive range of {m}")
    p.add_argument("--driver-memory", default="6g",
                   help="JVM heap of local mode's one process (driver and executors)")
    p.add_argument("--state-store", choices=["hdfs", "rocksdb"], default="hdfs",
                   help="state store provider: Spark's default in-memory one (HDFSBackedStateStore) or RocksDB "
                        "(off-heap, for state larger than the heap)")
    p.add_argument("--kafka-jars", default=os.environ.get("FMSFLOW_SPARK_KAFKA_JARS", ""),
                   help="folder of the Kafka connector jars (setup.sh's FMSFLOW_SPARK_KAFKA_JARS)")
    p.add_argument("--max-per-trigger", type=int, default=0, metavar="N",
                   help="cut the input into micro-batches of at most N files (files:) or N records (kafka:; "
                        "maxFilesPerTrigger / maxOffsetsPerTrigger); 0: one batch for all the input")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the query's checkpoint and state in OUT/_checkpoint (deleted by default)")
    a = p.parse_args(argv)
    kind, _, where = a.source.partition(":")
    if kind not in ("files", "kafka") or not where:
        p.error("--source must be files:GLOB_OR_DIR or kafka:BOOTSTRAP/TOPIC")
    if kind == "kafka":
        bootstrap, _, topic = where.rpartition("/")
        if not bootstrap or not topic:
            p.error("--source kafka: needs BOOTSTRAP/TOPIC, e.g. kafka:127.0.0.1:9092/fms.raw")
        if not a.kafka_jars or not os.path.isdir(a.kafka_jars):
            p.error("--source kafka: needs the connector jars: run scripts/spark/setup.sh and pass --kafka-jars "
                    "or set FMSFLOW_SPARK_KAFKA_JARS")
    if a.cores < 1 or a.fleet_size < 0:
        p.error("--cores must be at least 1 and --fleet-size at least 0")
    a.ranges = [tuple(getattr(a, f"{m}_range")) for m in METRICS]
    return a


def session(a):
    """The SparkSession, as the benchmark runs it: local[N], UTC, quiet, no UI."""
    from pyspark.sql import SparkSession

    b = (SparkSession.builder.appName("fmsflow-spark-baseline")
         .master(f"local[{a.cores}]")
         .config("spark.driver.memory", a.driver_memory)
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.session.timeZone", "UTC")
         .config("spark.sql.shuffle.partitions", str(2 * a.cores))
         # Timestamps as the lake writes them: INT64 TIMESTAMP(MILLIS, UTC), not INT96.
         .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MILLIS")
         # Every batch's progress (with its observed metrics) stays readable to the end.
         .config("spark.sql.streaming.numRecentProgressUpdates", "100000"))
    if a.state_store == "rocksdb":
        b = b.config("spark.sql.streaming.stateStore.providerClass",
                     "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider")
    if a.source.startswith("kafka:"):
        jars = sorted(os.path.join(a.kafka_jars, f) for f in os.listdir(a.kafka_jars) if f.endswith(".jar"))
        b = b.config("spark.jars", ",".join(jars))
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def input_files(where):
    """The files of files:WHERE, sorted: a glob's matching files (as fmsflow's file source
    expands it), a folder's files (not its sub-folders), or the one file."""
    if any(c in where for c in "*?["):
        files = [f for f in glob.glob(where) if os.path.isfile(f)]
    elif os.path.isdir(where):
        files = [os.path.join(where, f) for f in os.listdir(where) if os.path.isfile(os.path.join(where, f))]
    else:
        files = [where] if os.path.isfile(where) else []
    if not files:
        raise SystemExit(f"aggregates.py: no file matches {where!r}")
    return sorted(os.path.abspath(f) for f in files)


def hadoop_glob(files):
    """One path naming exactly these files, for the streaming file source: a Hadoop glob
    `DIR/{f1,f2,...}` of the files' paths below their common folder, with the glob's special
    characters escaped. (Given a folder, the source would list it recursively and infer
    partitions from its sub-folders; given one plain file, it refuses it: basePath must be a
    directory. Hadoop expands `{...}` with slashes inside, but not at the path's start.)"""
    def escape(f):
        return "".join("\\" + c if c in "\\{}[]*?," else c for c in f)
    base = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    return escape(base).rstrip("/") + "/{" + ",".join(escape(os.path.relpath(f, base)) for f in files) + "}"


def read_source(spark, a):
    """The raw records as (payload STRING, ingest_ms BIGINT or null, pos BIGINT or null), and
    the SQL of a record's own id: a rejected record's key in the dedup state must be its own.
    Kafka has one, the partition and offset (`pos`); a text file source has no line number
    (and monotonically_increasing_id() is refused in streaming), so there it is a uuid(),
    drawn only for rejected records."""
    from pyspark.sql import functions as F

    kind, _, where = a.source.partition(":")
    if kind == "files":
        reader = spark.readStream.format("text")
        if a.max_per_trigger:
            reader = reader.option("maxFilesPerTrigger", str(a.max_per_trigger))
        lines = reader.load(hadoop_glob(input_files(where))).where("value <> ''")
        # fmsflow's split_line: 1 to 18 digits and one space, else a bare payload.
        return lines.selectExpr(
            "value", "regexp_extract(value, '^([0-9]{1,18}) ', 1) AS prefix",
        ).selectExpr(
            "CASE WHEN prefix = '' THEN value ELSE substr(value, length(prefix) + 2) END AS payload",
            "CASE WHEN prefix = '' THEN NULL ELSE CAST(prefix AS BIGINT) END AS ingest_ms",
            "CAST(NULL AS BIGINT) AS pos",
        ), "uuid()"
    bootstrap, _, topic = where.rpartition("/")
    reader = (spark.readStream.format("kafka")
              .option("kafka.bootstrap.servers", bootstrap)
              .option("subscribe", topic)
              .option("startingOffsets", "earliest")
              .option("minPartitions", str(a.cores)))
    if a.max_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(a.max_per_trigger))
    raw = reader.load()
    # A record without a timestamp (-1) has no ingest time, as rdkafka's to_millis says.
    return raw.select(
        F.coalesce(F.col("value").cast("string"), F.lit("")).alias("payload"),
        F.expr("CASE WHEN timestampType = -1 OR unix_millis(timestamp) = -1 THEN NULL "
               "ELSE unix_millis(timestamp) END").alias("ingest_ms"),
        (F.col("partition").cast("long") * (1 << 40) + F.col("offset")).alias("pos"),
    ), "CAST(pos AS STRING)"


def opts_sql():
    return "map(" + ", ".join(f"'{k}', '{v}'" for k, v in JSON_OPTIONS.items()) + ")"


def validate(raw, rid, a):
    """Every stateless rule as SQL: one row per record with its `outcome` ('valid' or the
    rule), the quality device and hour, and for valid readings the typed fields.

    Built in small steps, each a projection over the previous one's columns: written as one
    expression, the time's parts are repeated wherever they are used, and the tree grows past
    what Spark's generated code handles well (it fell back to interpreted evaluation)."""
    opts = opts_sql()
    df = raw.selectExpr("payload", "ingest_ms", "pos", f"from_json(payload, '{TYPED_SCHEMA}', {opts}) AS j")

    # fmsflow's parse_rfc3339 (dataflows/src/time.rs): the shape by RFC3339, then the fields at
    # their fixed positions, checked against the calendar; second 60 counts as 59; of a
    # fraction, the first 3 digits are the milliseconds.
    df = df.selectExpr("*", f"CASE WHEN j.time RLIKE '{RFC3339}' THEN j.time END AS tf")
    df = df.selectExpr(
        "*",
        "CAST(substr(tf, 1, 4) AS INT) AS t_y", "CAST(substr(tf, 6, 2) AS INT) AS t_mo",
        "CAST(substr(tf, 9, 2) AS INT) AS t_d", "CAST(substr(tf, 12, 2) AS INT) AS t_h",
        "CAST(substr(tf, 15, 2) AS INT) AS t_mi", "CAST(substr(tf, 18, 2) AS INT) AS t_s",
        # The zone: 1 character (Z) or 6 (+HH:MM); the fraction's digits are between.
        "CASE WHEN right(tf, 1) IN ('Z', 'z') THEN 1 ELSE 6 END AS t_zlen")
    df = df.selectExpr(
        "*",
        "CASE WHEN t_zlen = 1 THEN 0 ELSE CAST(substr(tf, -5, 2) AS INT) END AS t_oh",
        "CASE WHEN t_zlen = 1 THEN 0 ELSE CAST(substr(tf, -2, 2) AS INT) END AS t_om",
        "CASE WHEN substr(tf, 20, 1) = '.' "
        "THEN CAST(rpad(substr(tf, 21, least(3, length(tf) - 20 - t_zlen)), 3, '0') AS INT) ELSE 0 END AS t_frac",
        "CASE WHEN t_mo IN (1, 3, 5, 7, 8, 10, 12) THEN 31 WHEN t_mo IN (4, 6, 9, 11) THEN 30 "
        "WHEN (t_y % 4 = 0 AND t_y % 100 <> 0) OR t_y % 400 = 0 THEN 29 ELSE 28 END AS t_dim")
    df = df.selectExpr(
        "payload", "ingest_ms", "pos", "j",
        "CASE WHEN tf IS NOT NULL AND t_mo BETWEEN 1 AND 12 AND t_d BETWEEN 1 AND t_dim AND t_h <= 23 "
        "AND t_mi <= 59 AND t_s <= 60 AND t_oh <= 23 AND t_om <= 59 "
        "THEN (CAST(unix_date(make_date(t_y, t_mo, t_d)) AS BIGINT) * 86400 + t_h * 3600 + t_mi * 60 + least(t_s, 59)"
        " - (CASE WHEN substr(tf, -6, 1) = '-' THEN -1 ELSE 1 END) * (t_oh * 60 + t_om) * 60) * 1000 + t_frac "
        "END AS t_ms")

    # Not an object: blank, JSON of another kind (wrong_type) or not JSON (malformed_json).
    # startswith is the cheap test every usual payload passes; the trims run only if it fails.
    is_object = f"(startswith(payload, '{{') OR substr(trim(LEADING {WS} FROM payload), 1, 1) = '{{')"
    is_json_value = (f"(trim(BOTH {WS} FROM payload) <> '' AND "
                     f"from_json(concat('{{\"v\": ', payload, '}}'), 'v STRING, _corrupt STRING', {opts})._corrupt IS NULL)")
    # Spark's parser stops after the object: text after it must be caught here.
    ends_object = f"(endswith(payload, '}}') OR right(trim(TRAILING {WS} FROM payload), 1) = '}}')"
    is_syntax_ok = f"(from_json(payload, '{TEXT_SCHEMA}', {opts})._corrupt IS NULL)"
    inf = " OR ".join(f"abs(j.{m}) = double('Infinity')" for m in METRICS)
    missing = " OR ".join(f"j.{f} IS NULL" for f in ["DeviceId", "time"] + METRICS + ["isFail"])
    out_of_range = " OR ".join(f"j.{m} < {lo!r} OR j.{m} > {hi!r}" for m, (lo, hi) in zip(METRICS, a.ranges))
    outcome = f"""CASE
        WHEN NOT {is_object} THEN CASE WHEN {is_json_value} THEN 'wrong_type' ELSE 'malformed_json' END
        WHEN j IS NULL OR j._corrupt IS NOT NULL OR NOT {ends_object}
            THEN CASE WHEN {ends_object} AND {is_syntax_ok} THEN 'wrong_type' ELSE 'malformed_json' END
        WHEN {inf} THEN 'non_finite'
        WHEN {missing} THEN 'missing_field'
        WHEN j.DeviceId < 1 OR j.DeviceId > {a.fleet_size} THEN 'unknown_device'
        WHEN t_ms IS NULL THEN CASE WHEN payload RLIKE '{TIME_IS_STRING}' THEN 'bad_time' ELSE 'wrong_type' END
        WHEN ingest_ms IS NOT NULL AND t_ms - ingest_ms > {a.max_future_ms} THEN 'future_time'
        WHEN ingest_ms IS NOT NULL AND ingest_ms - t_ms > {a.max_age_ms} THEN 'stale_time'
        WHEN {out_of_range} THEN 'out_of_range'
        ELSE 'valid' END"""
    df = df.selectExpr("ingest_ms", "pos", "j", "t_ms", f"{outcome} AS outcome")

    # The device and hour a record is counted under (Rejection::hour, LAKE.md's quality table):
    # the device once it was read and is in the fleet (0 for the decode-level rules and
    # unknown_device); valid readings in their event hour, rejections in the ingest hour, else
    # the event hour if it was read before the rejection, else hour 0.
    with_device = "('valid', 'bad_time', 'future_time', 'stale_time', 'out_of_range')"
    with_time = "('future_time', 'stale_time', 'out_of_range')"
    df = df.selectExpr(
        "*", f"coalesce(ingest_ms, CASE WHEN outcome IN {with_time} THEN t_ms END, 0) AS q_ms")
    df = df.selectExpr(
        "outcome",
        f"CASE WHEN outcome IN {with_device} THEN CAST(j.DeviceId AS INT) ELSE 0 END AS device",
        # The dedup time: the event time of a reading, the hour of a rejection.
        f"timestamp_millis(CASE WHEN outcome = 'valid' THEN t_ms ELSE q_ms - pmod(q_ms, {HOUR_MS}) END) AS ts",
        # A reading's dedup key is (device, event time); a rejection's is its own record.
        f"CASE WHEN outcome = 'valid' THEN NULL ELSE {rid} END AS rid",
        "CASE WHEN outcome = 'valid' THEN j.isFail END AS is_fail",
        *[f"CASE WHEN outcome = 'valid' THEN j.{m} END AS {m}" for m in METRICS])
    # The watermark's column: the hour, except for hours at or before 1970-01-01T00 (records
    # with no time at all are counted in hour 0): Spark's first watermark is 0, and a row at
    # or before it would be dropped as late. NULL is never late, and never forgotten.
    return df.selectExpr("*", "date_trunc('HOUR', ts) AS hour_start").selectExpr(
        "*", "CASE WHEN hour_start > TIMESTAMP '1970-01-01 00:00:00Z' THEN hour_start END AS wm")


def aggregate(rows, a):
    """Dedup and the per (device, hour, outcome) aggregates, as streaming operators. The
    watermark is on `wm` (the hour), which is in the keys of both, so both forget old state;
    as a function of ts, and of hour_start, it adds nothing to either key."""
    from pyspark.sql import functions as F

    delay_ms = a.max_age_ms + a.max_future_ms + HOUR_MS
    observed = rows.observe(
        "stateless", F.count(F.lit(1)).alias("records"),
        *[F.count_if(F.col("outcome") == o).alias(o) for o in ["valid"] + RULES[:-1]])
    deduped = (observed.withWatermark("wm", f"{delay_ms} milliseconds")
               .dropDuplicates(["device", "ts", "rid", "wm"]))
    aggs = [F.count(F.lit(1)).alias("count"),
            F.count_if(F.col("is_fail")).alias("fail_count"),
            F.min("ts").alias("first_time"),
            F.max("ts").alias("last_time")]
    for m in METRICS:
        aggs += [F.min(m).alias(f"{m}_min"), F.max(m).alias(f"{m}_max"),
                 F.avg(m).alias(f"{m}_mean"), F.stddev_pop(m).alias(f"{m}_stddev")]
    return (deduped.groupBy("device", "hour_start", "outcome", "wm").agg(*aggs).drop("wm")
            .withColumn("dt", F.date_format("hour_start", "yyyy-MM-dd"))
            .withColumn("hour", F.date_format("hour_start", "HH")))


HOURLY_COLUMNS = ["device", "hour_start", "count", "fail_count", "first_time", "last_time"] + [
    f"{m}_{s}" for m in METRICS for s in ("min", "max", "mean", "stddev")]


def write_batch(staging):
    """foreachBatch: the groups this batch changed, each with its full current value, into
    STAGING/batch=N/{hourly,quality}. Persisted so that the two writes run the batch once."""

    def run(df, batch_id):
        df.persist()
        try:
            base = os.path.join(staging, f"batch={batch_id}")
            (df.where("outcome = 'valid'").select(*HOURLY_COLUMNS, "dt", "hour")
             .write.mode("overwrite").partitionBy("dt", "hour").parquet(os.path.join(base, "hourly")))
            (df.select("device", "outcome", "count", "hour_start", "dt", "hour")
             .write.mode("overwrite").partitionBy("dt", "hour").parquet(os.path.join(base, "quality")))
        finally:
            df.unpersist()

    return run


def has_parquet(folder):
    return any(f.endswith(".parquet") for _, _, files in os.walk(folder) for f in files)


def finish(spark, staging, out):
    """Moves the batches' output into OUT/hourly and OUT/quality: as it is when one batch wrote
    them, else each group's row from the latest batch (one version, like fmsflow's lake)."""
    from pyspark.sql import Window, functions as F

    # Partition values as written (`hour=07`), not inferred as numbers.
    spark.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    batches = sorted((int(d.split("=", 1)[1]) for d in os.listdir(staging) if d.startswith("batch=")))
    for table, key in (("hourly", ["device", "hour_start"]), ("quality", ["device", "hour_start", "outcome"])):
        dest = os.path.join(out, table)
        written = [b for b in batches if has_parquet(os.path.join(staging, f"batch={b}", table))]
        if len(written) <= 1:
            if written:
                os.rename(os.path.join(staging, f"batch={written[0]}", table), dest)
            continue
        parts = [spark.read.parquet(os.path.join(staging, f"batch={b}", table)).withColumn("_batch", F.lit(b))
                 for b in written]
        df = parts[0]
        for p in parts[1:]:
            df = df.unionByName(p)
        latest = Window.partitionBy(*key).orderBy(F.col("_batch").desc())
        (df.withColumn("_n", F.row_number().over(latest)).where("_n = 1").drop("_n", "_batch")
         .write.partitionBy("dt", "hour").parquet(dest))
    shutil.rmtree(staging, ignore_errors=True)


def table(folder, columns):
    """The Parquet files under folder (a written table), or None when there are none."""
    import pyarrow.dataset as ds

    if not has_parquet(folder):
        return None
    return ds.dataset(folder, format="parquet", partitioning="hive").to_table(columns=columns)


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    out = os.path.abspath(a.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    staging, checkpoint = os.path.join(out, "_batches"), os.path.join(out, "_checkpoint")

    t0 = time.monotonic()
    spark = session(a)
    startup_s = time.monotonic() - t0

    raw, rid = read_source(spark, a)
    rows = validate(raw, rid, a)
    t1 = time.monotonic()
    query = (aggregate(rows, a).writeStream
             .outputMode("update")
             .foreachBatch(write_batch(staging))
             .option("checkpointLocation", checkpoint)
             .trigger(availableNow=True)
             .start())
    query.awaitTermination()
    query_s = time.monotonic() - t1
    if query.exception() is not None:
        raise SystemExit(f"the streaming query failed: {query.exception()}")

    # The stateless outcomes of every batch (observed as the query ran), and what each batch
    # took: its phases (ms) and its state operators' rows and memory.
    totals = {k: 0 for k in ["records", "valid"] + RULES[:-1]}
    batches = []
    for prog in query.recentProgress:
        seen = (prog.observedMetrics or {}).get("stateless")
        if seen is not None:
            for k in totals:
                totals[k] += seen[k] or 0
        batches.append({"batch": prog.batchId, "input_rows": prog.numInputRows, "ms": prog.durationMs,
                        "state": [{"op": s.operatorName, "rows": s.numRowsTotal, "updated": s.numRowsUpdated,
                                   "removed": s.numRowsRemoved, "memory_bytes": s.memoryUsedBytes}
                                  for s in prog.stateOperators]})

    t2 = time.monotonic()
    os.makedirs(staging, exist_ok=True)
    finish(spark, staging, out)
    finish_s = time.monotonic() - t2
    # Counted with pyarrow (installed beside pyspark): a Spark job for this would cost seconds.
    hourly = table(os.path.join(out, "hourly"), ["count"])
    quality = table(os.path.join(out, "quality"), ["count"])
    accepted = sum(hourly.column("count").to_pylist()) if hourly is not None else 0
    hourly_rows = hourly.num_rows if hourly is not None else 0
    quality_rows = quality.num_rows if quality is not None else 0
    if not a.keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)

    rejected = {r: totals[r] for r in RULES[:-1]}
    rejected["duplicate"] = totals["valid"] - accepted
    report = {
        "engine": "spark", "spark_version": spark.version, "source": a.source, "cores": a.cores,
        "fleet_size": a.fleet_size, "state_store": a.state_store, "shuffle_partitions": 2 * a.cores,
        "records": totals["records"], "valid": accepted, "rejected": rejected,
        "rejected_total": sum(rejected.values()), "hourly_rows": hourly_rows, "quality_rows": quality_rows,
        "batches": len(batches), "query_seconds": round(query_s, 3), "finish_seconds": round(finish_s, 3),
        "startup_seconds": round(startup_s, 3),
        "records_per_second": round(totals["records"] / query_s) if query_s > 0 else None,
        "out": out,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({**report, "batch_details": batches}, f, indent=1)
    spark.stop()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
