#!/usr/bin/env python3
"""Checks the Terraform of cluster/terraform without touching AWS or downloading providers.

Usage: python check_terraform.py <terraform-dir>

Run it with the Python of the venv that holds checkov and python-hcl2, e.g.

    ~/.cache/fmsflow/venv-terraform/bin/python tests/check_terraform.py cluster/terraform

It fails (exit 1, every problem on stderr) when
  1. a .tf file does not parse with hcl2.load (the file is named);
  2. a `checkov:skip=CHECK_ID` comment has no justification after the colon (at least three
     words), or names no valid check id;
  3. checkov (the one next to this Python) reports a failed check (id, resource, file:line
     are listed), a parsing error, no resources at all, or does not run;
  4. outputs.tf has no `ansible_inventory` output.
Otherwise it prints one line of JSON, {"files": N, "passed": P, "failed": 0, "skipped": S},
and exits 0. Exit 2: wrong usage.
"""

import json
import os
import re
import subprocess
import sys

# `# checkov:skip=CKV_AWS_18: why` (also after `//` or inside `/* */`).
SKIP_RE = re.compile(r"checkov:skip=(?P<id>[^:\s]*)(?P<rest>.*)$")
CHECK_ID_RE = re.compile(r"^(CKV2?|BC)_[A-Z0-9]+_[0-9]+$")
MIN_JUSTIFICATION_WORDS = 3


def tf_files(root):
    """Every .tf file under root (not in .terraform/), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".terraform")
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".tf"))
    return found


def check_parse(files):
    """Parses every file with hcl2.load; returns ({path: parsed}, problems)."""
    try:
        import hcl2
    except ImportError as e:
        return {}, [f"cannot import hcl2 (install python-hcl2 into {sys.prefix}): {e}"]
    parsed, problems = {}, []
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                parsed[path] = hcl2.load(fh)
        except Exception as e:  # the parser raises lark errors, ValueError, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{path}: does not parse with hcl2: {first}")
    return parsed, problems


def check_skips(files):
    """Every checkov:skip comment names a check id and justifies it; returns (count, problems)."""
    count, problems = 0, []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                m = SKIP_RE.search(line)
                if not m:
                    continue
                count += 1
                where = f"{path}:{lineno}"
                check_id = m.group("id")
                if not CHECK_ID_RE.match(check_id):
                    problems.append(f"{where}: checkov:skip names no valid check id: {line.strip()}")
                    continue
                rest = m.group("rest")
                justification = rest[1:] if rest.startswith(":") else ""
                justification = justification.strip().rstrip("*/").strip()
                if len(justification.split()) < MIN_JUSTIFICATION_WORDS:
                    problems.append(
                        f"{where}: checkov:skip={check_id} needs a justification after the colon "
                        f"(at least {MIN_JUSTIFICATION_WORDS} words): {line.strip()}"
                    )
    return count, problems


def run_checkov(root):
    """Runs checkov on root; returns (summary dict, problems)."""
    checkov = os.path.join(os.path.dirname(sys.executable), "checkov")
    summary = {"passed": 0, "failed": 0, "skipped": 0}
    if not os.path.exists(checkov):
        return summary, [f"checkov not found at {checkov} (install it into this Python's venv)"]
    cmd = [checkov, "-d", root, "--framework", "terraform", "-o", "json", "--quiet",
           # Nothing from the Prisma Cloud platform: the check must not depend on the network.
           "--skip-download"]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return summary, ["checkov did not finish within 900 s"]
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return summary, [f"checkov (exit {proc.returncode}) printed no JSON report; stderr ends:\n{tail}"]

    # One report is a dict, several (one per framework) a list. With no resource at all
    # checkov prints only a summary-like dict without "results".
    reports = out if isinstance(out, list) else [out]
    problems, resources, parsing_errors = [], 0, 0
    for report in reports:
        if not isinstance(report, dict):
            problems.append(f"checkov report is not an object: {report!r:.200}")
            continue
        s = report.get("summary", report)
        for key in summary:
            summary[key] += int(s.get(key, 0))
        resources += int(s.get("resource_count", 0))
        parsing_errors += int(s.get("parsing_errors", 0))
        results = report.get("results", {})
        for c in results.get("failed_checks", []):
            lines = c.get("file_line_range") or [0]
            path = os.path.join(root, str(c.get("file_path", "?")).lstrip("/"))
            problems.append(
                f"checkov FAILED {c.get('check_id')} ({c.get('check_name', '')}) "
                f"on {c.get('resource')} at {path}:{lines[0]}"
            )
        for p in results.get("parsing_errors", []) or []:
            problems.append(f"checkov could not parse {p}")
    if summary["failed"] and not any(p.startswith("checkov FAILED") for p in problems):
        problems.append(f"checkov reports {summary['failed']} failed check(s) without details")
    if parsing_errors and not any(p.startswith("checkov could not parse") for p in problems):
        problems.append(f"checkov reports {parsing_errors} parsing error(s)")
    if resources == 0:
        problems.append("checkov found no Terraform resources to check")
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not problems):
        problems.append(f"checkov exited {proc.returncode}; stderr ends:\n{tail}")
    return summary, problems


def check_inventory_output(root, parsed):
    """outputs.tf declares the `ansible_inventory` output."""
    path = os.path.join(root, "outputs.tf")
    if not os.path.exists(path):
        return [f"{path} is missing (it must declare the ansible_inventory output)"]
    if path not in parsed:
        return [f"{path}: cannot look for the ansible_inventory output, it did not parse"]
    names = set()
    for block in parsed[path].get("output", []):
        names.update(str(name).strip('"') for name in block)
    if "ansible_inventory" not in names:
        return [f'{path}: no output "ansible_inventory" (outputs: {", ".join(sorted(names)) or "none"})']
    return []


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    root = argv[1]
    if not os.path.isdir(root):
        print(f"check_terraform: {root} is not a directory", file=sys.stderr)
        return 2
    files = tf_files(root)
    if not files:
        print(f"check_terraform: no .tf file under {root}", file=sys.stderr)
        return 1

    parsed, problems = check_parse(files)
    skips, skip_problems = check_skips(files)
    problems += skip_problems
    summary, checkov_problems = run_checkov(root)
    problems += checkov_problems
    problems += check_inventory_output(root, parsed)

    if problems:
        for p in problems:
            print(f"FAIL: {p}", file=sys.stderr)
        print(f"check_terraform: {len(problems)} problem(s) in {root}", file=sys.stderr)
        return 1
    print(json.dumps({"files": len(files), "passed": summary["passed"],
                      "failed": summary["failed"], "skipped": summary["skipped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
