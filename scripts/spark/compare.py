#!/usr/bin/env python3
"""Checks that fmsflow and the Spark baseline (scripts/spark/aggregates.py) produced the same
aggregates from the same input.

Usage:
    "$FMSFLOW_SPARK_PYTHON" scripts/spark/compare.py --fmsflow-lake /tmp/lake --spark-out /tmp/spark-out
    ... [--fmsflow-bin target/release/fmsflow]   # list the lake's files with `fmsflow files`

Reads fmsflow's lake as a reader that follows the manifests does (docs/LAKE.md, "Commits"):
each hour's committed `hourly` and `quality` files, from `_fmsflow/manifests/dt=*/hour=*.json`,
or from `fmsflow files --table T` when --fmsflow-bin is given. Reads the Spark job's
`hourly/` and `quality/` tables and its report.json. DuckDB does the comparison.

Checks:
  - hourly: one row per (device, hour_start) on each side, and the same set of them;
  - count, fail_count, first_time, last_time and every metric's min and max: equal exactly;
  - every metric's mean and stddev: equal to 1e-9 relative (fmsflow derives them from exact
    fixed-point sums, Spark in floating point), with 1e-12 absolute as the floor, for values
    that are 0 on one side and a rounding error on the other;
  - quality: the count of every outcome over the run equal (valid and the ten rules; Spark's
    duplicates come from its report, as its quality table cannot hold them), and the counts
    per (device, hour, outcome) equal for every outcome but `duplicate`.

Exit 0 with a one-line summary when everything is equal; exit 1 listing the first differences
otherwise (exit 2 when an input is missing).
"""

import argparse
import glob
import json
import os
import subprocess
import sys

import duckdb

METRICS = ["sensor1", "sensor2", "sensor3", "motor1", "motor2", "motor3"]
RULES = ["malformed_json", "missing_field", "wrong_type", "unknown_device", "bad_time",
         "future_time", "stale_time", "non_finite", "out_of_range", "duplicate"]
EXACT = ["count", "fail_count", "first_time", "last_time"] + [f"{m}_{s}" for m in METRICS for s in ("min", "max")]
CLOSE = [f"{m}_{s}" for m in METRICS for s in ("mean", "stddev")]
REL_TOL, ABS_TOL = 1e-9, 1e-12
SHOW = 10  # differences listed per check


def parse_args():
    p = argparse.ArgumentParser(description="Check that fmsflow's lake and the Spark baseline's output hold the "
                                            "same hourly aggregates and quality counts (exit 0 if so, 1 if not).")
    p.add_argument("--fmsflow-lake", required=True, help="fmsflow's lake: a folder or a file:// URL")
    p.add_argument("--spark-out", required=True, help="the --out folder of scripts/spark/aggregates.py")
    p.add_argument("--fmsflow-bin", help="list the lake's committed files with `FMSFLOW_BIN files` "
                                         "(default: read the manifests directly)")
    return p.parse_args()


def lake_files(lake, table, fmsflow_bin):
    """The files of `table` that the lake's manifests list: each hour's committed version."""
    if fmsflow_bin:
        r = subprocess.run([fmsflow_bin, "files", "--lake", f"file://{lake}", "--table", table],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"compare.py: `fmsflow files` failed: {r.stderr.strip()}")
        return [line for line in r.stdout.splitlines() if line.strip()]
    files = []
    for manifest in sorted(glob.glob(os.path.join(lake, "_fmsflow", "manifests", "dt=*", "hour=*.json"))):
        with open(manifest) as f:
            files += [os.path.join(lake, key) for key in json.load(f).get("files", {}).get(table, [])]
    return files


def spark_files(out, table):
    return sorted(glob.glob(os.path.join(out, table, "dt=*", "hour=*", "*.parquet")))


def parquet(files):
    """A DuckDB relation over these files, with dt and hour from their paths."""
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"read_parquet([{listed}], hive_partitioning = true, hive_types = {{'dt': DATE, 'hour': INTEGER}})"


def main():
    a = parse_args()
    lake = a.fmsflow_lake[len("file://"):] if a.fmsflow_lake.startswith("file://") else a.fmsflow_lake
    lake, out = os.path.abspath(lake), os.path.abspath(a.spark_out)
    f_hourly, f_quality = lake_files(lake, "hourly", a.fmsflow_bin), lake_files(lake, "quality", a.fmsflow_bin)
    s_hourly, s_quality = spark_files(out, "hourly"), spark_files(out, "quality")
    report_path = os.path.join(out, "report.json")
    for what, files in (("fmsflow hourly", f_hourly), ("fmsflow quality", f_quality),
                        ("Spark hourly", s_hourly), ("Spark quality", s_quality)):
        if not files:
            print(f"compare.py: no {what} files (lake {lake}, Spark output {out})", file=sys.stderr)
            return 2
    if not os.path.exists(report_path):
        print(f"compare.py: no {report_path}", file=sys.stderr)
        return 2
    with open(report_path) as f:
        report = json.load(f)

    db = duckdb.connect()
    db.execute("SET TimeZone = 'UTC'")
    db.execute(f"CREATE VIEW fh AS SELECT * FROM {parquet(f_hourly)}")
    db.execute(f"CREATE VIEW sh AS SELECT * FROM {parquet(s_hourly)}")
    db.execute(f"CREATE VIEW fq AS SELECT device, outcome, count, dt, hour FROM {parquet(f_quality)}")
    db.execute(f"CREATE VIEW sq AS SELECT device, outcome, count, dt, hour FROM {parquet(s_quality)}")

    problems = []

    def check(title, sql, fmt):
        rows = db.execute(sql).fetchall()
        if rows:
            problems.append(f"{title}: {len(rows)}" + "".join(f"\n    {fmt(r)}" for r in rows[:SHOW])
                            + ("\n    ..." if len(rows) > SHOW else ""))

    for side in ("fh", "sh"):
        check(f"{'fmsflow' if side == 'fh' else 'Spark'} hourly rows with the same (device, hour_start)",
              f"SELECT device, hour_start, count(*) AS n FROM {side} GROUP BY ALL HAVING n > 1 ORDER BY ALL",
              lambda r: f"device {r[0]} hour {r[1]}: {r[2]} rows")
    check("(device, hour) only in fmsflow's hourly",
          "SELECT device, hour_start FROM fh EXCEPT SELECT device, hour_start FROM sh ORDER BY ALL",
          lambda r: f"device {r[0]} hour {r[1]}")
    check("(device, hour) only in Spark's hourly",
          "SELECT device, hour_start FROM sh EXCEPT SELECT device, hour_start FROM fh ORDER BY ALL",
          lambda r: f"device {r[0]} hour {r[1]}")
    # Column by column over the common keys: the first columns that differ in each row.
    differs = [f"CASE WHEN f.{c} IS DISTINCT FROM s.{c} THEN '{c}: ' || f.{c} || ' vs ' || s.{c} END" for c in EXACT]
    differs += [f"CASE WHEN NOT (abs(f.{c} - s.{c}) <= greatest({REL_TOL} * greatest(abs(f.{c}), abs(s.{c})), {ABS_TOL})) "
                f"THEN '{c}: ' || f.{c} || ' vs ' || s.{c} END" for c in CLOSE]
    check("hourly rows whose values differ (fmsflow vs Spark)",
          f"""SELECT device, hour_start, list_filter([{', '.join(differs)}], lambda x: x IS NOT NULL) AS d
              FROM fh f JOIN sh s USING (device, hour_start) WHERE len(d) > 0 ORDER BY device, hour_start""",
          lambda r: f"device {r[0]} hour {r[1]}: " + "; ".join(r[2][:4]) + (" ..." if len(r[2]) > 4 else ""))
    worst = db.execute("SELECT " + ", ".join(
        f"max(abs(f.{c} - s.{c}) / nullif(greatest(abs(f.{c}), abs(s.{c})), 0))" for c in CLOSE)
        + " FROM fh f JOIN sh s USING (device, hour_start)").fetchone()
    worst_mean = max((v for v in worst[0::2] if v is not None), default=0.0)
    worst_sd = max((v for v in worst[1::2] if v is not None), default=0.0)

    # Quality: per (device, hour, outcome) for all but duplicates, then per outcome over the run.
    check("quality counts per (device, hour, outcome) that differ (fmsflow vs Spark), duplicates aside",
          """SELECT coalesce(f.dt, s.dt), coalesce(f.hour, s.hour), coalesce(f.device, s.device),
                    coalesce(f.outcome, s.outcome), f.count, s.count
             FROM (SELECT * FROM fq WHERE outcome <> 'duplicate') f
             FULL JOIN sq s ON f.dt = s.dt AND f.hour = s.hour AND f.device = s.device AND f.outcome = s.outcome
             WHERE f.count IS DISTINCT FROM s.count ORDER BY 1, 2, 3, 4""",
          lambda r: f"{r[0]} hour {r[1]:02d} device {r[2]} {r[3]}: {r[4]} vs {r[5]}")
    f_tot = dict(db.execute("SELECT outcome, sum(count)::BIGINT FROM fq GROUP BY outcome").fetchall())
    s_tot = {"valid": report["valid"], **report["rejected"]}
    for o in ["valid"] + RULES:
        if f_tot.get(o, 0) != s_tot.get(o, 0):
            problems.append(f"{o} over the run: fmsflow {f_tot.get(o, 0):,} vs Spark {s_tot.get(o, 0):,}")
    hourly_rows = db.execute("SELECT count(*) FROM fh").fetchone()[0]
    quality_rows = db.execute("SELECT count(*) FROM fq").fetchone()[0]
    if problems:
        print("DIFFERENT: fmsflow's lake and the Spark output disagree")
        for p in problems:
            print("  " + p)
        return 1
    rejected = sum(v for k, v in f_tot.items() if k != "valid")
    print(f"EQUAL: {hourly_rows:,} hourly rows (device, hour) equal (counts, times, min/max exact; mean rel. diff "
          f"<= {worst_mean:.1e}, stddev <= {worst_sd:.1e}); {quality_rows:,} quality rows; rule counts equal "
          f"({f_tot.get('valid', 0):,} valid, {rejected:,} rejected)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
