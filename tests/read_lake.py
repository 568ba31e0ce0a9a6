"""Reads an fmsflow lake with DuckDB and pyarrow, unchanged, and prints a JSON summary.

Used by tests/demo_lake.rs: the lake must be readable by standard tools as it is.
Usage: python3 read_lake.py <lake-dir>
"""
import json
import sys

import duckdb
import pyarrow.dataset as ds

lake = sys.argv[1]
con = duckdb.connect()


def q(sql):
    return con.sql(sql).fetchall()


def src(table):
    return f"read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning=true)"


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
out["pyarrow_rows"] = {
    t: ds.dataset(f"{lake}/{t}", format="parquet", partitioning="hive").count_rows()
    for t in ["readings", "hourly", "quality"]
}
print(json.dumps(out, default=str))
