#!/usr/bin/env bash
# Installs what the PySpark baseline (scripts/spark/aggregates.py, compare.py) needs, cached
# under ${FMSFLOW_CACHE:-$HOME/.cache/fmsflow}; quick and silent when everything is there.
# Run `scripts/spark/setup.sh --help` for details.
set -euo pipefail

SPARK_VERSION=4.0.0         # pyspark from PyPI and the connector from Maven Central. Newer 4.0.x
                            # pyspark releases exist, but of 4.0.x only 4.0.0 had every jar of
                            # the connector (spark-token-provider-kafka) on Maven Central here;
                            # Spark 4.0 runs on Java 17 and 21, Scala 2.13
SCALA_BINARY=2.13
DUCKDB_VERSION=2.0.1        # the versions scripts/test installs for the lake read-back tests
PYARROW_VERSION=26.0.1
DEP_PLUGIN_VERSION=3.8.1    # maven-dependency-plugin, pinned as in scripts/kafka

CACHE="${FMSFLOW_CACHE:-$HOME/.cache/fmsflow}"
VENV="$CACHE/spark-venv"
VENV_STAMP="$VENV/fmsflow-requirements.txt"
JHOME="$CACHE/spark-kafka-$SPARK_VERSION"
JARS="$JHOME/jars"
JAR_STAMP="$JHOME/fetched.stamp"

usage() {
  cat <<EOF
Usage: scripts/spark/setup.sh [--check]

Installs, once, into \$FMSFLOW_CACHE (default ~/.cache/fmsflow):
  spark-venv/                  a Python venv with pyspark==$SPARK_VERSION, duckdb==$DUCKDB_VERSION and
                               pyarrow==$PYARROW_VERSION (from PyPI, with pip)
  spark-kafka-$SPARK_VERSION/jars/     org.apache.spark:spark-sql-kafka-0-10_$SCALA_BINARY:$SPARK_VERSION and its
                               runtime dependencies (from Maven Central, with Maven), less the
                               jars pyspark already ships (same artifact in pyspark/jars)
Later calls find both in place and only check them.

It needs Python 3.9+ (python3.11 if present, else python3; or \$FMSFLOW_SPARK_BASE_PYTHON), Maven
(mvn) and Java 17+ (JAVA_HOME, else java on the PATH).

On success it prints, on stdout, the environment the jobs run with, as lines a shell can eval:
  FMSFLOW_SPARK_PYTHON=<the venv's python>
  FMSFLOW_SPARK_KAFKA_JARS=<the jars folder>   (aggregates.py reads it for --source kafka:)
  JAVA_HOME=<the JDK Spark runs on>
e.g.  eval "\$(scripts/spark/setup.sh)"
      "\$FMSFLOW_SPARK_PYTHON" scripts/spark/aggregates.py --help
Progress and errors go to stderr.

  --print-env  Print the same as one JSON object instead (what scripts/lib/bench.py reads).
  --check      Install nothing: exit 0 if everything is in place, 1 (naming what is missing) if not.
EOF
}

die() { printf 'spark-setup: %s\n' "$*" >&2; exit 1; }
note() { printf 'spark-setup: %s\n' "$*" >&2; }

CHECK_ONLY=0
PRINT_JSON=0
while (($#)); do
  case "$1" in
    --check) CHECK_ONLY=1; shift ;;
    --print-env) PRINT_JSON=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# ------------------------------------------------------------------ Java -----------------

find_java_home() {
  local java
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME"; return; fi
  java="$(command -v java)" || die "java not found: Spark $SPARK_VERSION needs Java 17 or 21 (apt-get install openjdk-17-jdk-headless)"
  java="$(readlink -f "$java")"
  echo "${java%/bin/java}"
}
JAVA_HOME="$(find_java_home)"
JAVA_MAJOR="$("$JAVA_HOME/bin/java" -version 2>&1 | awk -F'"' 'NR == 1 { split($2, a, "."); print a[1] }')"
if ! [[ "$JAVA_MAJOR" =~ ^[0-9]+$ ]] || ((JAVA_MAJOR < 17)); then
  die "Spark $SPARK_VERSION needs Java 17 or 21; $JAVA_HOME/bin/java is version ${JAVA_MAJOR:-unknown}"
fi
export JAVA_HOME

# ------------------------------------------------------------------ the venv -------------

requirements() {
  printf '%s\n' "pyspark==$SPARK_VERSION" "duckdb==$DUCKDB_VERSION" "pyarrow==$PYARROW_VERSION"
}

venv_ok() {
  [[ -x "$VENV/bin/python" && -f "$VENV_STAMP" && "$(cat "$VENV_STAMP")" == "$(requirements)" ]] \
    && "$VENV/bin/python" -c "import pyspark, duckdb, pyarrow; assert pyspark.__version__ == '$SPARK_VERSION'" 2>/dev/null
}

ensure_venv() {
  venv_ok && return 0
  ((CHECK_ONLY)) && die "no venv with $(requirements | paste -sd' ') at $VENV (run scripts/spark/setup.sh)"
  local py="${FMSFLOW_SPARK_BASE_PYTHON:-}"
  if [[ -z "$py" ]]; then py="$(command -v python3.11 || command -v python3 || true)"; fi
  [[ -n "$py" ]] || die "no python3 found (set FMSFLOW_SPARK_BASE_PYTHON)"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || die "$py is older than Python 3.9, which pyspark $SPARK_VERSION needs"
  note "creating $VENV with $(requirements | paste -sd' ') (pyspark is some 400 MB) ..."
  rm -rf "$VENV"
  "$py" -m venv "$VENV" || die "$py -m venv failed (Debian: apt-get install python3-venv)"
  local log reqs; log="$(mktemp)"
  mapfile -t reqs < <(requirements)
  if ! "$VENV/bin/pip" install --disable-pip-version-check --no-input "${reqs[@]}" >"$log" 2>&1; then
    tail -n 30 "$log" >&2; rm -f "$log"
    die "pip could not install $(requirements | paste -sd' ')"
  fi
  rm -f "$log"
  requirements >"$VENV_STAMP"
  venv_ok || die "the venv at $VENV was made but does not import pyspark $SPARK_VERSION, duckdb and pyarrow"
}

# ------------------------------------------------------------------ Kafka connector jars -

pom_xml() {
  cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by fmsflow scripts/spark/setup.sh: Spark $SPARK_VERSION's Kafka source and its dependencies. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>fmsflow.local</groupId>
  <artifactId>spark-kafka-jars</artifactId>
  <version>$SPARK_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.spark</groupId>
      <artifactId>spark-sql-kafka-0-10_$SCALA_BINARY</artifactId>
      <version>$SPARK_VERSION</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>$DEP_PLUGIN_VERSION</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
EOF
}

# Spark's parent POM lists a Google Cloud Storage copy of Maven Central as a repository for
# the connector's dependencies. Where that host cannot be reached (only Maven Central can
# here), Maven fails on it instead of moving on, so it is mapped to Maven Central itself. As
# global settings (-gs), so a user's ~/.m2/settings.xml (mirrors, proxies) still applies.
maven_settings() {
  cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <mirrors>
    <mirror>
      <id>spark-gcs-mirror-is-central</id>
      <mirrorOf>gcs-maven-central-mirror</mirrorOf>
      <url>https://repo.maven.apache.org/maven2</url>
    </mirror>
  </mirrors>
</settings>
EOF
}

jars_ok() {
  [[ -f "$JAR_STAMP" && -d "$JARS" && "$(cat "$JAR_STAMP")" == "$(pom_xml)" ]] \
    && [[ -f "$JARS/spark-sql-kafka-0-10_$SCALA_BINARY-$SPARK_VERSION.jar" ]]
}

ensure_jars() {
  jars_ok && return 0
  ((CHECK_ONLY)) && die "no Spark Kafka connector jars at $JARS (run scripts/spark/setup.sh)"
  command -v mvn >/dev/null || die "mvn (Maven) is not installed: it fetches the Spark Kafka connector jars (apt-get install maven)"
  mkdir -p "$JHOME"
  # One fetch at a time; a second caller finds the stamp afterwards.
  exec 9>"$JHOME/.fetch.lock"
  command -v flock >/dev/null && flock 9
  if ! jars_ok; then
    local work pyjars; work="$(mktemp -d)"
    pom_xml >"$work/pom.xml"
    maven_settings >"$work/settings.xml"
    note "fetching spark-sql-kafka-0-10_$SCALA_BINARY $SPARK_VERSION and its dependencies from Maven Central ..."
    rm -rf "$JHOME/jars.partial"
    # The runtime closure (Spark itself is a `provided` dependency of the connector, so it is
    # not in it), and the same list as group:artifact:type:version:scope lines.
    if ! mvn -q -B -Dstyle.color=never -gs "$work/settings.xml" -f "$work/pom.xml" \
          dependency:copy-dependencies -DincludeScope=runtime \
          -DoutputDirectory="$JHOME/jars.partial" >"$work/mvn.log" 2>&1 \
       || ! mvn -q -B -Dstyle.color=never -gs "$work/settings.xml" -f "$work/pom.xml" \
          dependency:list -DincludeScope=runtime -DoutputFile="$work/deps.txt" \
          -DexcludeTransitive=false >>"$work/mvn.log" 2>&1; then
      printf 'spark-setup: Maven could not fetch the jars; its output:\n' >&2
      tail -n 60 "$work/mvn.log" >&2
      rm -rf "$work" "$JHOME/jars.partial"
      exit 1
    fi
    # Drop what pyspark ships in another version (slf4j-api, lz4-java, snappy-java, zstd-jni,
    # commons-pool2, ...): two versions of a class on one classpath is a clash, and Spark's own
    # is the one its other jars were built against.
    pyjars="$("$VENV/bin/python" -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
    [[ -d "$pyjars" ]] || die "pyspark has no jars folder at $pyjars"
    local line artifact version kept=() dropped=()
    while read -r line; do
      # "   group:artifact:jar:version:scope" (classifier-less: the connector's closure has none)
      IFS=: read -r _ artifact _ version _ <<<"$(sed 's/^[[:space:]]*//; s/ .*//' <<<"$line")"
      [[ -n "$artifact" && -n "$version" ]] || continue
      if compgen -G "$pyjars/$artifact-[0-9]*.jar" >/dev/null; then
        rm -f "$JHOME/jars.partial/$artifact-$version.jar"
        dropped+=("$artifact")
      else
        kept+=("$artifact-$version")
      fi
    done < <(grep -E '^[[:space:]]*[^[:space:]]+:[^[:space:]]+:jar:' "$work/deps.txt")
    [[ -f "$JHOME/jars.partial/spark-sql-kafka-0-10_$SCALA_BINARY-$SPARK_VERSION.jar" ]] \
      || { rm -rf "$work"; die "fetched jars lack spark-sql-kafka-0-10_$SCALA_BINARY-$SPARK_VERSION.jar"; }
    rm -rf "$JARS"
    mv "$JHOME/jars.partial" "$JARS"
    pom_xml >"$JAR_STAMP"
    rm -rf "$work"
    note "kept ${kept[*]}; left out (pyspark ships them): ${dropped[*]:-none}"
  fi
  exec 9>&-
}

ensure_venv
ensure_jars
if ((PRINT_JSON)); then
  # The paths are the cache's and the JDK's: no quotes or backslashes to escape in practice,
  # but let Python write the JSON so that any path is safe.
  "$VENV/bin/python" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    FMSFLOW_SPARK_PYTHON "$VENV/bin/python" FMSFLOW_SPARK_KAFKA_JARS "$JARS" JAVA_HOME "$JAVA_HOME"
else
  printf 'FMSFLOW_SPARK_PYTHON=%q\nFMSFLOW_SPARK_KAFKA_JARS=%q\nJAVA_HOME=%q\n' "$VENV/bin/python" "$JARS" "$JAVA_HOME"
fi
