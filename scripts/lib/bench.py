#!/usr/bin/env python3
"""The driver of `scripts/bench`: fmsflow's benchmarks side by side with the Spark Structured
Streaming baseline, on this machine, in one invocation. Standard library only (the Spark job
runs in its own venv, see scripts/spark/). Run `scripts/bench --help` for the options.

Sub-benchmarks (each prints a table and writes OUT/<name>.json):
  replay   N generated readings in files -> parse, validate, hourly aggregates, Parquet:
           `fmsflow run --source file:` at each worker count, and the Spark job on the same
           files at the same core counts; both lakes' aggregates are compared first
  kafka    the same readings through a real broker: Kafka's own ConsumerPerformance, the
           engine at 1 and 2 workers (benches/kafka.rs), and the Spark job's Kafka source on
           the same topic (with the same aggregates check against `fmsflow run`)
  live     produce -> aggregate-update latency at fixed offered rates (benches/latency.rs)
  query    query latency while ingesting (benches/query.rs)
  memory   RSS over time of the live pipeline's processes (scripts/soak, shortened)
  report   only redraws OUT's plots and summary from its JSON files

At the end: OUT/summary.md (the tables, the ratios and each target met or missed) and the
plots OUT/throughput.svg, OUT/latency-cdf.svg, OUT/rss.svg.
"""

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import soak_plot  # noqa: E402  (the axes, ticks and lines of the soak plot serve these plots too)

CACHE = os.environ.get("FMSFLOW_CACHE", os.path.expanduser("~/.cache/fmsflow"))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BIN = os.path.join(TARGET, "release", "fmsflow")
SPARK_DIR = os.path.join(ROOT, "scripts", "spark")
ALL = ["replay", "kafka", "live", "query", "memory"]

# The targets (docs/BENCHMARKS.md says where each stands).
TARGET_REPLAY_MSGS = 2_000_000  # msg/s on 2 workers
TARGET_SPARK_RATIO = 40.0
TARGET_KAFKA_RATIO = 0.8  # of Kafka's own consumer tool
TARGET_LIVE_P99_MS = 100  # at 10,000 msg/s
TARGET_RSS_MB = 150  # per process, at 10,000 devices (10^6 bytes)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def num_list(text):
    try:
        return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("subs", nargs="*", metavar="SUB", help=f"which to run (default: {' '.join(ALL)})")
    p.add_argument("--out", help="results directory (default target/bench/<date-time>)")
    p.add_argument("--readings", type=int, default=10_000_000, help="readings per replay and Kafka run (default 10,000,000)")
    p.add_argument("--devices", type=num_list, default=[100, 100_000], help="fleet sizes of the replay (default 100,100000)")
    p.add_argument("--workers", type=num_list, default=[1, 2], help="fmsflow workers = Spark cores (default 1,2)")
    p.add_argument("--runs", type=int, default=3, help="fmsflow runs per replay case; the median is reported (default 3)")
    p.add_argument("--spark-runs", type=int, default=1, help="Spark runs per case (default 1)")
    p.add_argument("--no-spark", action="store_true", help="leave the Spark baseline out (no ratios)")
    p.add_argument("--dirty-rate", type=float, default=0.01,
                   help="share of generated records that break a rule (default 0.01: both sides validate for real)")
    p.add_argument("--rates", type=num_list, default=[1_000, 10_000, 50_000], help="live: offered msg/s (default 1000,10000,50000)")
    p.add_argument("--live-secs", type=int, default=20, help="live: measured seconds per rate (default 20)")
    p.add_argument("--query-secs", type=int, default=30, help="query: measured seconds (default 30)")
    p.add_argument("--memory-minutes", type=float, default=10, help="memory: minutes of the live pipeline (default 10)")
    p.add_argument("--memory-devices", type=int, default=10_000, help="memory: simulated devices (default 10,000)")
    p.add_argument("--memory-interval", default="10s", help="memory: poll interval per device (default 10s: 1,000 msg/s)")
    p.add_argument("--lake-dir", help="where the runs' lakes and Spark's output are written (default: /dev/shm, a tmpfs, "
                   "when it has 8 GiB free, else target/): on a disk, the fsyncs and inode allocations of a run's "
                   "~2,000 files vary by seconds from run to run, for both engines")
    p.add_argument("--kafka-port", type=int, default=23092,
                   help="base port of the benchmark's own broker (default 23092, below the ephemeral range)")
    a = p.parse_args(argv)
    for s in a.subs:
        if s not in ALL + ["report"]:
            p.error(f"unknown sub-benchmark {s!r}: choose from {', '.join(ALL + ['report'])}")
    a.subs = a.subs or list(ALL)
    if a.out is None:
        if a.subs == ["report"]:
            p.error("report needs --out DIR (an earlier run's results)")
        a.out = os.path.join(TARGET, "bench", time.strftime("%Y%m%d-%H%M%S"))
    if a.lake_dir is None:
        a.lake_dir = default_lake_dir()
    os.makedirs(a.lake_dir, exist_ok=True)
    if a.readings < 1 or a.runs < 1 or a.spark_runs < 1:
        p.error("--readings, --runs and --spark-runs must be at least 1")
    return a


# --- processes ------------------------------------------------------------------------------

def tree_rss_kib(pid):
    """VmRSS of a process and all its descendants, in KiB (0 once it is gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def measured(cmd, env=None, log_path=None, sample_s=0.1):
    """Runs cmd to its end, sampling its process tree's RSS. Returns (seconds, peak MiB,
    [(seconds since start, MiB)], its output). Raises with the output when it fails."""
    out = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    samples = []
    try:
        while proc.poll() is None:
            kib = tree_rss_kib(proc.pid)
            if kib:
                samples.append((time.monotonic() - start, kib / 1024))
            time.sleep(sample_s)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    secs = time.monotonic() - start
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    out.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text[-4000:]}")
    peak = max((m for _, m in samples), default=0.0)
    return secs, peak, samples, text


def run(cmd, env=None, **kw):
    """Runs cmd, failing with its output."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r.stdout


def env_with(**extra):
    e = dict(os.environ)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def default_lake_dir():
    """/dev/shm when it is a tmpfs with room for the largest run's lake and Spark's output
    (both engines write there, so neither times the disk), else target/."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        with open("/proc/mounts") as f:
            tmpfs = any(line.split()[1] == shm and line.split()[2] == "tmpfs" for line in f)
    except OSError:
        return TARGET
    return shm if tmpfs and st.f_bavail * st.f_frsize >= 8 * 2**30 else TARGET


def filesystem(path):
    """The type of the filesystem `path` is on (the longest mount point above it)."""
    path, best = os.path.realpath(path), ("", "?")
    with open("/proc/mounts") as f:
        for line in f:
            mount, kind = line.split()[1:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
                best = (mount, kind)
    return best[1]


def machine(lake_dir):
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "rustc": first(["rustc", "--version"]),
        "java": java[0] if java else "?",
        "commit": first(["git", "-C", ROOT, "log", "-1", "--format=%h %s"]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "lake_dir": lake_dir,
        "lake_fs": filesystem(lake_dir),
    }


def save(out, name, doc):
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    log(f"results: {path}")


def load(out, name):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def table(header, rows):
    """A Markdown table (also what is printed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_rate(v):
    return f"{v:,.0f}" if v is not None else "–"


# --- Spark ----------------------------------------------------------------------------------

class Spark:
    """The Spark baseline of scripts/spark: installed (cached) once per invocation."""

    def __init__(self):
        log("Spark: installing what is missing (scripts/spark/setup.sh; cached in the fmsflow cache)")
        self.env = json.loads(run(["bash", os.path.join(SPARK_DIR, "setup.sh"), "--print-env"]).strip().splitlines()[-1])
        self.python = self.env["FMSFLOW_SPARK_PYTHON"]

    def aggregates(self, source, out_dir, cores, fleet, log_path):
        """Runs the job; returns its own JSON report with the process's seconds and RSS."""
        cmd = [self.python, os.path.join(SPARK_DIR, "aggregates.py"), "--source", source, "--out", out_dir,
               "--cores", str(cores), "--fleet-size", str(fleet)]
        secs, peak, samples, text = measured(cmd, env=env_with(**self.env), log_path=log_path, sample_s=0.5)
        report = None
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    report = json.loads(line)
                except json.JSONDecodeError:
                    pass
        if report is None:
            raise RuntimeError(f"the Spark job printed no JSON report (log: {log_path})")
        report.update(process_seconds=secs, peak_rss_mib=peak, rss=samples)
        return report

    def compare(self, lake, spark_out):
        """(equal?, the checker's summary line or its first differences)."""
        r = subprocess.run([self.python, os.path.join(SPARK_DIR, "compare.py"), "--fmsflow-lake", lake,
                            "--spark-out", spark_out, "--fmsflow-bin", BIN],
                           capture_output=True, text=True, env=env_with(**self.env))
        return r.returncode == 0, (r.stdout + r.stderr).strip()


# --- replay ---------------------------------------------------------------------------------

def input_file(devices, readings, dirty):
    """The generated input, cached: the same file for every run, of both engines."""
    d = os.path.join(CACHE, "bench")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"gen-{devices}d-{readings}r-{dirty:g}dirty.ndjson")
    if not os.path.exists(path):
        log(f"generating {readings:,} readings of {devices:,} devices into {path}")
        run([BIN, "gen", "--devices", str(devices), "--readings", str(readings), "--dirty-rate", str(dirty),
             "--out", path + ".tmp"])
        os.rename(path + ".tmp", path)
    return path


def warm(path):
    """Reads `path` once, untimed, so every timed run of either engine finds it in the page
    cache (the first run after another case's file otherwise reads it from the disk)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def fmsflow_env(devices):
    return env_with(FMSFLOW_FLEET__DEVICES=devices, FMSFLOW_LOG="warn")


def bench_replay(a, spark):
    rows, work = [], tempfile.mkdtemp(prefix="fmsflow-bench-", dir=a.lake_dir)
    try:
        for devices in a.devices:
            path = input_file(devices, a.readings, a.dirty_rate)
            mb = os.path.getsize(path) / 1e6
            warm(path)
            for w in a.workers:
                times, peaks, lake = [], [], None
                for i in range(a.runs):
                    lake = os.path.join(work, f"lake-{devices}-{w}")
                    shutil.rmtree(lake, ignore_errors=True)
                    secs, peak, samples, _ = measured(
                        [BIN, "run", "--source", f"file:{path}", "--lake", f"file://{lake}", "--workers", str(w)],
                        env=fmsflow_env(devices))
                    times.append(secs)
                    peaks.append(peak)
                    log(f"fmsflow  {devices:>7,} devices, {w} worker(s), run {i + 1}: {secs:6.2f} s "
                        f"{a.readings / secs:>12,.0f} msg/s, peak RSS {peak:,.0f} MiB")
                med = statistics.median(times)
                rows.append({"engine": "fmsflow", "devices": devices, "parallelism": w, "readings": a.readings,
                             "input_mb": mb, "seconds": times, "median_seconds": med, "msgs_per_s": a.readings / med,
                             "peak_rss_mib": max(peaks), "rss": samples})
                if spark is None:
                    continue
                for i in range(a.spark_runs):
                    sout = os.path.join(work, f"spark-{devices}-{w}")
                    shutil.rmtree(sout, ignore_errors=True)
                    rep = spark.aggregates(f"files:{path}", sout, w, devices, os.path.join(a.out, f"spark-replay-{devices}-{w}.log"))
                    ok, said = spark.compare(lake, sout)
                    qs = rep["query_seconds"]
                    log(f"Spark    {devices:>7,} devices, {w} core(s),   run {i + 1}: {qs:6.2f} s in the query "
                        f"({rep['process_seconds']:.1f} s with start-up) {a.readings / qs:>10,.0f} msg/s, "
                        f"peak RSS {rep['peak_rss_mib']:,.0f} MiB; aggregates {'EQUAL' if ok else 'DIFFER'}")
                    if not ok:
                        log(f"the aggregates differ, so no time is compared:\n{said}")
                    rows.append({"engine": "spark", "devices": devices, "parallelism": w, "readings": a.readings,
                                 "input_mb": mb, "seconds": [qs], "median_seconds": qs, "msgs_per_s": a.readings / qs,
                                 "process_seconds": rep["process_seconds"], "startup_seconds": rep.get("startup_seconds"),
                                 "peak_rss_mib": rep["peak_rss_mib"], "rss": rep["rss"], "aggregates_equal": ok,
                                 "check": said.splitlines()[-1] if said else "", "spark": {k: v for k, v in rep.items() if k != "rss"}})
                    shutil.rmtree(sout, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bench": "replay", "readings": a.readings, "dirty_rate": a.dirty_rate, "rows": rows}


def replay_table(doc):
    rows = doc["rows"]
    spark = {(r["devices"], r["parallelism"]): r for r in rows if r["engine"] == "spark"}
    out = []
    for r in rows:
        if r["engine"] != "fmsflow":
            continue
        s = spark.get((r["devices"], r["parallelism"]))
        ratio = f"{r['msgs_per_s'] / s['msgs_per_s']:.1f}×" if s and s.get("aggregates_equal") else "–"
        spread = f"{doc['readings'] / max(r['seconds']):,.0f}–{doc['readings'] / min(r['seconds']):,.0f}"
        out.append([f"{r['devices']:,}", r["parallelism"], fmt_rate(r["msgs_per_s"]), spread,
                    f"{r['peak_rss_mib']:,.0f}",
                    fmt_rate(s["msgs_per_s"]) if s else "–",
                    f"{s['process_seconds']:.1f}" if s else "–",
                    f"{s['peak_rss_mib']:,.0f}" if s else "–",
                    ("yes" if s["aggregates_equal"] else "NO") if s else "–", ratio])
    return table(["devices", "workers = cores", "fmsflow msg/s (median)", "fmsflow range", "fmsflow peak RSS MiB",
                  "Spark msg/s (query)", "Spark s with start-up", "Spark peak RSS MiB", "same aggregates",
                  "fmsflow / Spark"], out)


# --- Kafka and live -------------------------------------------------------------------------

class Kafka:
    """A 1-broker Kafka of the benchmark's own (scripts/kafka), logs in memory when it can."""

    def __init__(self, port):
        self.dir = "/dev/shm/fmsflow-bench-kafka" if os.access("/dev/shm", os.W_OK) else os.path.join(CACHE, "kafka-bench")
        self.env = env_with(FMSFLOW_KAFKA_PORT=port)
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "kafka"), "stop", "--dir", self.dir],
                       env=self.env, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"Kafka: starting 1 broker on 127.0.0.1:{port}, logs under {self.dir}")
        run(["bash", os.path.join(ROOT, "scripts", "kafka"), "start", "--brokers", "1", "--dir", self.dir], env=self.env)
        with open(os.path.join(self.dir, "bootstrap")) as f:
            self.bootstrap = f.read().strip()

    def stop(self):
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "kafka"), "stop", "--dir", self.dir],
                       env=self.env, capture_output=True)
        if self.dir.startswith("/dev/shm/"):
            shutil.rmtree(self.dir, ignore_errors=True)


def cargo_bench(name, json_path, **env):
    """Runs benches/<name>.rs, streaming its table; returns its JSON results."""
    log(f"cargo bench --bench {name}")
    e = env_with(FMSFLOW_BENCH_JSON=json_path, **env)
    r = subprocess.run(["cargo", "bench", "--quiet", "--features", "hdfs", "--bench", name], cwd=ROOT, env=e)
    if r.returncode != 0:
        raise RuntimeError(f"cargo bench --bench {name} failed ({r.returncode})")
    with open(json_path) as f:
        return json.load(f)


def bench_kafka(a, kafka, spark):
    doc = cargo_bench("kafka", os.path.join(a.out, "kafka-rust.json"),
                      FMSFLOW_KAFKA_BOOTSTRAP=kafka.bootstrap, FMSFLOW_BENCH_READINGS=a.readings,
                      TMPDIR=a.lake_dir)  # the bench's lake: a temporary directory
    rows = doc["rows"]
    topic = rows[0]["topic"]
    if spark is not None:
        work = tempfile.mkdtemp(prefix="fmsflow-bench-", dir=a.lake_dir)
        try:
            lake = os.path.join(work, "lake")
            secs, peak, _, _ = measured(
                [BIN, "run", "--source", "kafka", "--brokers", kafka.bootstrap, "--from", "earliest", "--until", "end",
                 "--lake", f"file://{lake}", "--workers", "2"],
                env=env_with(FMSFLOW_LOG="warn", FMSFLOW_KAFKA__RAW_TOPIC=topic,
                             FMSFLOW_KAFKA__GROUP=f"bench.cli.{topic}",
                             FMSFLOW_KAFKA__HOURLY_TOPIC=f"{topic}.hourly", FMSFLOW_KAFKA__REJECTS_TOPIC=f"{topic}.rejects"))
            log(f"fmsflow run --source kafka (2 workers, with the lake and the output topics): {secs:.2f} s, "
                f"{rows[0]['records'] / secs:,.0f} msg/s, peak RSS {peak:,.0f} MiB")
            rows.append({"case": "fmsflow_run_cli", "workers": 2, "records": rows[0]["records"], "seconds": secs,
                         "msgs_per_s": rows[0]["records"] / secs, "peak_rss_mib": peak})
            for cores in a.workers:
                sout = os.path.join(work, f"spark-{cores}")
                rep = spark.aggregates(f"kafka:{kafka.bootstrap}/{topic}", sout, cores, 100,
                                       os.path.join(a.out, f"spark-kafka-{cores}.log"))
                ok, said = spark.compare(lake, sout)
                qs = rep["query_seconds"]
                log(f"Spark from Kafka, {cores} core(s): {qs:.2f} s in the query, {rows[0]['records'] / qs:,.0f} msg/s, "
                    f"peak RSS {rep['peak_rss_mib']:,.0f} MiB; aggregates {'EQUAL' if ok else 'DIFFER'}")
                if not ok:
                    log(f"the aggregates differ:\n{said}")
                rows.append({"case": "spark_kafka", "workers": cores, "records": rows[0]["records"], "seconds": qs,
                             "msgs_per_s": rows[0]["records"] / qs, "process_seconds": rep["process_seconds"],
                             "peak_rss_mib": rep["peak_rss_mib"], "aggregates_equal": ok})
                shutil.rmtree(sout, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    doc["readings"] = a.readings
    return doc


def best(rows, case, workers=None):
    """The best rate of a case over its rounds (the rounds are repeats of the same work)."""
    vals = [r["msgs_per_s"] for r in rows if r["case"] == case and (workers is None or r.get("workers") == workers)]
    return max(vals) if vals else None


def kafka_table(doc):
    rows = doc["rows"]
    cp = best(rows, "kafka_consumer_perf")
    lines = []
    for case, label in [("kafka_consumer_perf", "Kafka's ConsumerPerformance (1 thread, with the group join)"),
                        ("kafka_consumer_perf_fetching", "Kafka's ConsumerPerformance, fetching only"),
                        ("fmsflow_reader_only", "fmsflow partition reader alone (1 thread)"),
                        ("fmsflow_engine", "fmsflow engine: parse+validate+aggregate"),
                        ("fmsflow_engine_parquet", "fmsflow engine: + Parquet lake"),
                        ("fmsflow_run_cli", "fmsflow run --source kafka --until end (lake + output topics)"),
                        ("spark_kafka", "Spark Structured Streaming, Kafka source (query time)")]:
        for w in sorted({r.get("workers") for r in rows if r["case"] == case}):
            v = best(rows, case, w)
            eq = [r.get("aggregates_equal") for r in rows if r["case"] == case and r.get("workers") == w]
            note = "" if case != "spark_kafka" else (" (same aggregates)" if all(eq) else " (AGGREGATES DIFFER)")
            lines.append([label + note, w, fmt_rate(v), f"{v / cp:.2f}" if cp and v else "–"])
    return table(["case", "workers", "msg/s (best of the rounds)", "÷ ConsumerPerformance"], lines)


def live_table(doc):
    return table(["offered msg/s", "achieved msg/s", "readings measured", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                 [[f"{r['rate']:,}", fmt_rate(r["achieved_msgs_per_s"]), f"{r['measured']:,}", r["p50_ms"], r["p90_ms"],
                   r["p99_ms"], r["max_ms"]] for r in doc["rows"]])


def query_table(doc):
    return table(["query", "queries", "ingest msg/s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                 [[r["kind"], f"{r['queries']:,}", fmt_rate(r["ingest_msgs_per_s"]), f"{r['p50_ms']:.3f}",
                   f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['max_ms']:.3f}"] for r in doc["rows"]])


# --- memory ---------------------------------------------------------------------------------

def bench_memory(a):
    sdir = os.path.join(a.out, "soak")
    cmd = ["bash", os.path.join(ROOT, "scripts", "soak"), "--minutes", str(a.memory_minutes), "--devices",
           str(a.memory_devices), "--interval", a.memory_interval, "--out", sdir, "--sample-seconds", "5"]
    log("memory: " + " ".join(cmd[1:]))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/soak failed ({r.returncode}); see {sdir}")
    import csv
    with open(os.path.join(sdir, "rss.csv")) as f:
        data = list(csv.DictReader(f))
    rows = []
    warm = float(a.memory_minutes) * 60 / 3
    for key, label, _ in soak_plot.PROCS:
        vals = [(float(d["elapsed_s"]), float(d[f"{key}_rss_mib"])) for d in data if d.get(f"{key}_rss_mib")]
        if not vals:
            continue
        steady = [v for t, v in vals if t >= warm] or [v for _, v in vals]
        hwm = [float(d[f"{key}_hwm_mib"]) for d in data if d.get(f"{key}_hwm_mib")]
        slope = soak_plot.slope_per_hour([{"elapsed_s": t, "v": v} for t, v in vals if t >= warm], "v")
        rows.append({"process": label, "steady_median_mib": statistics.median(steady), "steady_max_mib": max(steady),
                     "peak_mib": max(hwm + [v for _, v in vals]), "slope_mib_per_h": slope, "rss": vals})
    return {"bench": "memory", "devices": a.memory_devices, "interval": a.memory_interval,
            "minutes": a.memory_minutes, "rows": rows, "summary": os.path.join(sdir, "summary.txt")}


def memory_table(doc, replay):
    def slope(r):
        return "–" if r.get("slope_mib_per_h") is None else f"{r['slope_mib_per_h']:+,.0f}"
    lines = [[r["process"], f"{r['steady_median_mib']:,.0f}", f"{r['steady_max_mib']:,.0f}", f"{r['peak_mib']:,.0f}", slope(r)]
             for r in doc["rows"]] if doc else []
    for r in (replay or {}).get("rows", []):
        who = "fmsflow run (replay)" if r["engine"] == "fmsflow" else "Spark job (replay, driver + JVM)"
        lines.append([f"{who}, {r['devices']:,} devices, {r['parallelism']} worker(s)", "–", "–", f"{r['peak_rss_mib']:,.0f}", "–"])
    return table(["process", "steady RSS MiB (median)", "steady RSS MiB (max)", "peak RSS MiB", "slope MiB/h (steady)"], lines)


# --- plots ----------------------------------------------------------------------------------

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def svg_lines(path, title, xlabel, ylabel, series, xmax=None, ymax=None, note="", logy=False):
    """One panel of lines: series = [(label, [(x, y)], dashed?)]. With logy, y is drawn on a
    log scale (decades from the smallest value's down to the largest's up)."""
    W, H, left, top, pw, ph = 900, 520, 90, 50, 560, 380
    if logy:
        series = [(label, [(x, math.log10(y)) for x, y in pts if y > 0], d) for label, pts, d in series]
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts]
    xt, xtop = soak_plot.ticks((xmax or max(xs or [1])) * 1.0, 6)
    if logy:
        lo, hi = math.floor(min(ys or [0])), math.ceil(max(ys or [1]))
        hi = hi if hi > lo else lo + 1
        yt = list(range(lo, hi + 1))
        # The panel maps [0, top]: shift the values so the lowest decade sits at 0.
        series = [(label, [(x, y - lo) for x, y in pts], d) for label, pts, d in series]
        panel = soak_plot.Panel(left, top, pw, ph, xtop, hi - lo)
    else:
        yt, ytop = soak_plot.ticks((ymax or max(ys or [1])) * 1.08, 6)
        panel = soak_plot.Panel(left, top, pw, ph, xtop, ytop)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="#fafafa"/>',
         f'<text x="{left}" y="28" font-size="15" font-weight="bold">{escape(title)}</text>']
    if logy:
        o += soak_plot.axes(panel, xt, [], ylabel, xlabel)
        for k in yt:
            y = panel.py(k - lo)
            o.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            o.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{si(10 ** k)}</text>')
    else:
        o += soak_plot.axes(panel, xt, yt, ylabel, xlabel)
    for i, (label, pts, dashed) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        o += soak_plot.polyline(panel, sorted(pts), colour, dash="6 4" if dashed else None)
        for x, y in pts if len(pts) <= 12 else []:
            o.append(f'<circle cx="{panel.px(x):.1f}" cy="{panel.py(y):.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 + 18 * i
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        o.append(f'<line x1="{left + pw + 16}" y1="{ly - 4}" x2="{left + pw + 40}" y2="{ly - 4}" stroke="{colour}" '
                 f'stroke-width="2"{dash}/>')
        o.append(f'<text x="{left + pw + 46}" y="{ly}">{escape(label)}</text>')
    if note:
        o.append(f'<text x="{left}" y="{H - 12}" fill="#555">{escape(note)}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")
    log(f"plot: {path}")


def si(v):
    """1000 -> 1k, 2000000 -> 2M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def plots(out, docs):
    replay, live, memory = docs.get("replay"), docs.get("live"), docs.get("memory")
    if replay:
        series = []
        for engine in ("fmsflow", "spark"):
            for d in sorted({r["devices"] for r in replay["rows"]}):
                pts = [(r["parallelism"], r["msgs_per_s"]) for r in replay["rows"]
                       if r["engine"] == engine and r["devices"] == d]
                if pts:
                    series.append((f"{engine}, {d:,} devices", pts, engine == "spark"))
        svg_lines(os.path.join(out, "throughput.svg"), f"Replay throughput, {replay['readings']:,} readings",
                  "workers (fmsflow) = cores (Spark)", "msg/s (log scale)", series,
                  xmax=max(r["parallelism"] for r in replay["rows"]), logy=True,
                  note="files -> parse, validate, hourly aggregates -> Parquet; dashed: Spark Structured Streaming (query time)")
        rss = [(f"{r['engine']}, {r['devices']:,} dev, {r['parallelism']} w", [(t, m) for t, m in r["rss"]], r["engine"] == "spark")
               for r in replay["rows"] if r.get("rss")]
        svg_lines(os.path.join(out, "rss-replay.svg"), "RSS over one replay run (process tree)", "seconds", "MiB", rss,
                  note="fmsflow: one `fmsflow run` per line; Spark: driver + JVM")
    if live:
        series = [(f"{r['rate']:,} msg/s offered", [(v, p) for p, v in r["cdf_ms"]], False) for r in live["rows"]]
        svg_lines(os.path.join(out, "latency-cdf.svg"), "Live latency, produce -> aggregate update (CDF)", "ms",
                  "percent of readings", series, ymax=100 / 1.08,
                  note="measured from the Kafka produce timestamp to the changelog record that includes the reading")
    if memory:
        series = [(r["process"], [(t / 60, m) for t, m in r["rss"]], False) for r in memory["rows"]]
        svg_lines(os.path.join(out, "rss.svg"),
                  f"RSS of the live pipeline's processes, {memory['devices']:,} devices every {memory['interval']}",
                  "minutes", "MiB", series, note=f"target: {TARGET_RSS_MB} MB ({TARGET_RSS_MB / 1.048576:.0f} MiB) per process")


# --- summary --------------------------------------------------------------------------------

def summary(out, docs):
    m = docs.get("machine") or {}
    parts = [f"# fmsflow benchmarks, {m.get('date', '?')}", "",
             f"Machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB, kernel {m.get('kernel')}; "
             f"{m.get('rustc')}; {m.get('java')}. Commit: {m.get('commit')}. "
             f"Lakes and Spark's output in {m.get('lake_dir', '?')} ({m.get('lake_fs', '?')}).", ""]
    verdicts = []
    replay = docs.get("replay")
    if replay:
        parts += [f"## replay: {replay['readings']:,} readings from files (dirty rate {replay['dirty_rate']:g})", "",
                  replay_table(replay), ""]
        for d in sorted({r["devices"] for r in replay["rows"]}):
            f2 = [r for r in replay["rows"] if r["engine"] == "fmsflow" and r["devices"] == d and r["parallelism"] == 2]
            s2 = [r for r in replay["rows"] if r["engine"] == "spark" and r["devices"] == d and r["parallelism"] == 2]
            if f2:
                v = f2[0]["msgs_per_s"]
                verdicts.append(f"replay ≥ 2M msg/s on 2 workers, {d:,} devices: {v:,.0f} — "
                                + ("met" if v >= TARGET_REPLAY_MSGS else f"missed by {100 * (1 - v / TARGET_REPLAY_MSGS):.0f} %"))
            if f2 and s2 and s2[0].get("aggregates_equal"):
                ratio = f2[0]["msgs_per_s"] / s2[0]["msgs_per_s"]
                verdicts.append(f"replay ≥ 40× Spark, {d:,} devices, 2 workers = 2 cores: {ratio:.1f}× — "
                                + ("met" if ratio >= TARGET_SPARK_RATIO else f"missed by {100 * (1 - ratio / TARGET_SPARK_RATIO):.0f} %"))
    kafka = docs.get("kafka")
    if kafka:
        parts += [f"## kafka: {kafka['readings']:,} readings through one broker", "", kafka_table(kafka), ""]
        cp, eng = best(kafka["rows"], "kafka_consumer_perf"), best(kafka["rows"], "fmsflow_engine_parquet", 2)
        if cp and eng:
            verdicts.append(f"Kafka ingest ≥ 0.8× ConsumerPerformance (engine with the lake, 2 workers): {eng / cp:.2f}× — "
                            + ("met" if eng / cp >= TARGET_KAFKA_RATIO else f"missed by {100 * (1 - eng / cp / TARGET_KAFKA_RATIO):.0f} %"))
    live = docs.get("live")
    if live:
        parts += ["## live: produce → aggregate update", "", live_table(live), ""]
        for r in live["rows"]:
            if r["rate"] == 10_000:
                verdicts.append(f"live p99 < 100 ms at 10k msg/s: {r['p99_ms']} ms — "
                                + ("met" if r["p99_ms"] < TARGET_LIVE_P99_MS else f"missed by {r['p99_ms'] - TARGET_LIVE_P99_MS} ms"))
    query = docs.get("query")
    if query:
        parts += ["## query: latency while ingesting", "", query_table(query), ""]
    memory = docs.get("memory")
    if memory or replay:
        parts += ["## memory", "", memory_table(memory, replay), ""]
    if memory:
        for r in memory["rows"]:
            mb = r["peak_mib"] * 1.048576
            growth = r.get("slope_mib_per_h") or 0
            note = (f" in this {memory['minutes']:g}-minute run, but it grows {growth:+,.0f} MiB/h at real time until its "
                    "windows fill (the open hour's readings, the duplicate rule's max_age + 1 h): see docs/OPERATIONS.md, Memory"
                    if growth > 10 and mb < TARGET_RSS_MB else "")
            verdicts.append(f"RSS < 150 MB per process at {memory['devices']:,} devices, {r['process']}: peak {mb:,.0f} MB — "
                            + (f"met{note}" if mb < TARGET_RSS_MB else f"missed by {mb - TARGET_RSS_MB:,.0f} MB"))
    if verdicts:
        parts += ["## targets", ""] + [f"- {v}" for v in verdicts] + [""]
    text = "\n".join(parts)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + text)


def main(argv):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    docs = {}
    if a.subs != ["report"]:
        docs["machine"] = machine(a.lake_dir)
        save(a.out, "machine", docs["machine"])
        needs_spark = not a.no_spark and ({"replay", "kafka"} & set(a.subs))
        spark = Spark() if needs_spark else None
        failed = []
        kafka = Kafka(a.kafka_port) if {"kafka", "live"} & set(a.subs) else None
        try:
            for sub in a.subs:
                log(f"=== {sub}")
                try:
                    if sub == "replay":
                        doc = bench_replay(a, spark)
                    elif sub == "kafka":
                        doc = bench_kafka(a, kafka, spark)
                    elif sub == "live":
                        doc = cargo_bench("latency", os.path.join(a.out, "live-rust.json"), FMSFLOW_KAFKA_BOOTSTRAP=kafka.bootstrap,
                                          FMSFLOW_BENCH_RATES=",".join(map(str, a.rates)), FMSFLOW_BENCH_SECS=a.live_secs)
                    elif sub == "query":
                        doc = cargo_bench("query", os.path.join(a.out, "query-rust.json"), FMSFLOW_BENCH_SECONDS=a.query_secs)
                    else:
                        doc = bench_memory(a)
                except RuntimeError as e:
                    log(f"{sub} FAILED: {e}")
                    failed.append(sub)
                    continue
                save(a.out, sub, doc)
        finally:
            if kafka:
                kafka.stop()
    else:
        failed = []
    for name in ["machine"] + ALL:
        docs[name] = docs.get(name) or load(a.out, name)
    plots(a.out, docs)
    summary(a.out, docs)
    unequal = [r for d in (docs.get("replay"), docs.get("kafka")) if d for r in d["rows"] if r.get("aggregates_equal") is False]
    if unequal:
        log(f"{len(unequal)} Spark run(s) gave different aggregates: see the logs in {a.out}")
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed or unequal else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
