"""Reads an fmsflow lake with DuckDB and pyarrow, unchanged, and prints a JSON summary.

Used by the integration tests: the lake must be readable by standard tools as it is.
Usage: python3 read_lake.py <lake-dir | s3://bucket/prefix>
A local lake is read by DuckDB's own Parquet reader. An S3 lake is read through pyarrow's
S3 filesystem (at AWS_ENDPOINT_URL, with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_REGION), each table a Hive-partitioned pyarrow dataset that DuckDB scans.
"""
import json
import os
import sys
from urllib.parse import urlparse

import duckdb
import pyarrow.dataset as ds

lake = sys.argv[1]
con = duckdb.connect()
fs = None
if lake.startswith("s3://"):
    import pyarrow.fs

    endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ.get("AWS_REGION", "us-east-1"),
        force_virtual_addressing=False,
    )
    lake = lake[len("s3://"):].rstrip("/")


def dataset(table):
    if fs is None:
        return ds.dataset(f"{lake}/{table}", format="parquet", partitioning="hive")
    # The files listed first: s3s-fs answers a HEAD of a folder's key with an error (S3
    # answers 404), so pyarrow is not given the folder itself.
    base = f"{lake}/{table}"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(base)
    return ds.dataset(
        files, format="parquet", filesystem=fs, partitioning=ds.partitioning(flavor="hive"), partition_base_dir=base
    )


def q(sql):
    return con.sql(sql).fetchall()


def src(table):
    if fs is None:
        return f"read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning=true)"
    name = f"lake_{table}"
    try:
        con.register(name, dataset(table))
    except FileNotFoundError:
        raise duckdb.IOException(f"no {table} table")
    return name


out = {}
out["hourly_by_hour"] = [
    {"dt": str(dt), "hour": int(h), "rows": rows, "devices": devs, "count": int(cnt)}
    for dt, h, rows, devs, cnt in q(
        f"select dt, hour, count(*), count(distinct device), sum(count) from {src('hourly')} group by all order by all"
    )
]
out["readings_by_hour"] = {
    f"{dt}/{int(h):02d}": n for dt, h, n in q(f"select dt, hour, count(*) from {src('readings')} group by all")
}
out["readings"], out["readings_distinct"] = q(f"select count(*), count(distinct (device, time)) from {src('readings')}")[0]
out["readings_bad_hour"] = q(
    f"select count(*) from {src('readings')} where strftime(time, '%Y-%m-%d') <> cast(dt as varchar) or hour(time) <> cast(hour as integer)"
)[0][0]
out["quality"] = {o: int(n) for o, n in q(f"select outcome, sum(count) from {src('quality')} group by all")}
try:
    out["rejects"] = {r: n for r, n in q(f"select rule, count(*) from {src('rejects')} group by all")}
except duckdb.IOException:
    out["rejects"] = {}
# Fails counted in the hourly table equal failing readings.
out["hourly_fails"] = int(q(f"select coalesce(sum(fail_count), 0) from {src('hourly')}")[0][0])
out["readings_fails"] = q(f"select count(*) from {src('readings')} where is_fail")[0][0]
# Means recomputed from readings agree with the hourly table.
out["max_mean_error"] = q(
    f"""select coalesce(max(abs(h.sensor1_mean - r.m)), 0) from {src('hourly')} h
        join (select device, dt, hour, avg(sensor1) m from {src('readings')} group by all) r
        using (device, dt, hour)"""
)[0][0]
# pyarrow reads every table as a Hive-partitioned dataset.
out["pyarrow_rows"] = {t: dataset(t).count_rows() for t in ["readings", "hourly", "quality"]}
print(json.dumps(out, default=str))
