"""Compares two fmsflow lakes row by row with DuckDB, as any reader of the Parquet sees them.

Usage: python3 lake_rows.py <lake-dir-a> <lake-dir-b>
Every table (readings, hourly, quality, rejects) must hold the same rows in both: every
column equal, except the hourly means and standard deviations, which may differ in the last
bits (their sums are added in another order when the readings are spread over other workers)
and must agree to 1e-9 relative. Prints a JSON summary of the rows compared; exits 1 naming
the first difference.
"""
import json
import math
import sys

import duckdb

a, b = sys.argv[1], sys.argv[2]
con = duckdb.connect()
KEYS = {
    "readings": "device, time",
    "hourly": "device, hour_start",
    "quality": "device, dt, hour, outcome",
    "rejects": "rule, source, \"offset\"",
}


def rows(lake, table):
    try:
        rel = con.sql(
            f"select * exclude (dt, hour) from read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning=true) "
            f"order by {KEYS[table]}"
            if table != "quality"
            else f"select * from read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning=true) order by {KEYS[table]}"
        )
    except duckdb.IOException:
        return [], []
    return rel.columns, rel.fetchall()


def close(x, y):
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1.0)
    return x == y


summary = {}
for table in KEYS:
    cols_a, ra = rows(a, table)
    cols_b, rb = rows(b, table)
    if cols_a and cols_b and cols_a != cols_b:
        sys.exit(f"{table}: columns differ: {cols_a} against {cols_b}")
    if len(ra) != len(rb):
        sys.exit(f"{table}: {len(ra)} rows in {a}, {len(rb)} in {b}")
    approx = [i for i, c in enumerate(cols_a) if table == "hourly" and (c.endswith("_mean") or c.endswith("_stddev"))]
    for n, (x, y) in enumerate(zip(ra, rb)):
        for i, (u, v) in enumerate(zip(x, y)):
            if u == v or (i in approx and close(u, v)):
                continue
            sys.exit(f"{table}, row {n} in key order, column {cols_a[i]}: {u!r} in {a}, {v!r} in {b}\n{x}\n{y}")
    summary[table] = len(ra)
print(json.dumps(summary))
