//! Golden tests of the quality rules: every file `tests/golden/<rule>.txt` holds records the
//! rule must reject (and nearby records it must let through), `valid.txt` records every rule
//! must accept. The harness enumerates the directory, so a new file or a new line is a new
//! case. The format is described at the top of each file:
//!
//! ```text
//! # comment; blank lines are ignored
//! pass <ingest> <payload>       the record is accepted
//! fail <ingest> <payload>       the record is rejected by the file's rule, and
//! reason: <text>                (required after each fail) <text> is part of the reason
//! pass-hex / fail-hex <ingest> <hex bytes>   the same, the payload written in hex
//! ```
//!
//! `<ingest>` is the record's ingest time (RFC 3339) or `-` for none. `<payload>` is the rest
//! of the line after one space, byte for byte (possibly empty). Records are checked with
//! `RuleConfig::default()` (fleet of 100, 5 minutes into the future, 6 hours into the past),
//! in file order with source 0 and offsets 1, 2, … (one per case); `duplicate.txt` also runs
//! the accepted ones through a `Deduper`, as the dataflow does.

use std::path::{Path, PathBuf};

use fmsflow_dataflows::rules::{validate, Deduper, Rejection, Rule, RuleConfig};
use fmsflow_dataflows::time::{parse_rfc3339, HOUR_MS};
use fmsflow_dataflows::{RawRecord, SourcePos};

/// One case of a golden file.
#[derive(Debug)]
struct Case {
    line: usize,
    pass: bool,
    ingest_ms: Option<i64>,
    payload: Vec<u8>,
    reason: Option<String>,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            u8::from_str_radix(pair, 16).map_err(|e| format!("bad hex byte {pair:?}: {e}"))
        })
        .collect()
}

fn parse(text: &[u8]) -> Result<Vec<Case>, String> {
    let mut cases: Vec<Case> = Vec::new();
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let at = |e: String| format!("line {n}: {e}");
        if line.iter().all(u8::is_ascii_whitespace) || line.starts_with(b"#") {
            continue;
        }
        let text = std::str::from_utf8(line).map_err(|e| at(format!("not UTF-8 ({e}): use pass-hex/fail-hex")))?;
        if let Some(reason) = text.strip_prefix("reason: ") {
            match cases.last_mut() {
                Some(c) if !c.pass && c.reason.is_none() => c.reason = Some(reason.to_string()),
                _ => return Err(at("a `reason:` line must follow a `fail` line".into())),
            }
            continue;
        }
        if let Some(c) = cases.last().filter(|c| !c.pass && c.reason.is_none()) {
            return Err(format!(
                "line {}: a `fail` line needs a `reason:` line after it",
                c.line
            ));
        }
        let (verb, rest) = text
            .split_once(' ')
            .ok_or_else(|| at("expected `<verb> <ingest> <payload>`".into()))?;
        let (ingest, payload) = rest.split_once(' ').unwrap_or((rest, ""));
        let ingest_ms = match ingest {
            "-" => None,
            t => Some(parse_rfc3339(t).ok_or_else(|| at(format!("bad ingest time {t:?}")))?),
        };
        let (pass, payload) = match verb {
            "pass" => (true, payload.as_bytes().to_vec()),
            "fail" => (false, payload.as_bytes().to_vec()),
            "pass-hex" => (true, hex(payload).map_err(at)?),
            "fail-hex" => (false, hex(payload).map_err(at)?),
            v => return Err(at(format!("unknown verb {v:?}"))),
        };
        cases.push(Case {
            line: n,
            pass,
            ingest_ms,
            payload,
            reason: None,
        });
    }
    if let Some(c) = cases.last().filter(|c| !c.pass && c.reason.is_none()) {
        return Err(format!(
            "line {}: a `fail` line needs a `reason:` line after it",
            c.line
        ));
    }
    Ok(cases)
}

/// Runs one file's cases; returns a description of every case that does not hold.
fn check_file(path: &Path) -> Result<usize, Vec<String>> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let rule = match name.as_str() {
        "valid" => None,
        other => match Rule::from_name(other) {
            Some(r) => Some(r),
            None => return Err(vec![format!("{}: not a rule's name", path.display())]),
        },
    };
    let text = std::fs::read(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let cases = parse(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let cfg = RuleConfig::default();
    let mut deduper = (rule == Some(Rule::Duplicate)).then(|| Deduper::new(cfg.max_age_ms + HOUR_MS));
    let mut errors = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        let at = format!("{}:{}", path.display(), case.line);
        let pos = SourcePos {
            source: 0,
            offset: k as u64 + 1,
        };
        let raw = RawRecord {
            payload: case.payload.clone().into(),
            ingest_ms: case.ingest_ms,
            pos,
        };
        let outcome: Result<(), Rejection> = validate(raw, &cfg).and_then(|reading| match deduper.as_mut() {
            Some(d) => match d.admit(&reading) {
                Ok(()) => Ok(()),
                Err(first) => Err(Rejection::duplicate(&reading, case.payload.clone(), first)),
            },
            None => Ok(()),
        });
        match (case.pass, outcome) {
            (true, Ok(())) => {}
            (true, Err(r)) => errors.push(format!(
                "{at}: expected a pass, rejected by {} ({})",
                r.rule.name(),
                r.reason
            )),
            (false, Ok(())) => errors.push(format!("{at}: expected a rejection by {name}, accepted")),
            (false, Err(r)) => {
                let want = case.reason.as_deref().unwrap_or_default();
                if Some(r.rule) != rule {
                    errors.push(format!(
                        "{at}: expected a rejection by {name}, rejected by {} ({})",
                        r.rule.name(),
                        r.reason
                    ));
                } else if !r.reason.contains(want) {
                    errors.push(format!("{at}: reason {:?} does not contain {want:?}", r.reason));
                }
                if r.payload != case.payload || r.ingest_ms != case.ingest_ms || r.pos != pos {
                    errors.push(format!("{at}: the rejection does not keep the original record"));
                }
            }
        }
    }
    if rule.is_some() && !cases.iter().any(|c| !c.pass) {
        errors.push(format!("{}: no `fail` case for its rule", path.display()));
    }
    if rule.is_none() && cases.iter().any(|c| !c.pass) {
        errors.push(format!("{}: `fail` cases need a rule's file", path.display()));
    }
    if errors.is_empty() {
        Ok(cases.len())
    } else {
        Err(errors)
    }
}

#[test]
fn golden_files() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    // Every rule has its file, so deleting one is noticed.
    for name in Rule::ALL.iter().map(|r| r.name()).chain(["valid"]) {
        assert!(
            files.iter().any(|p| p.file_stem().is_some_and(|s| s == name)),
            "tests/golden/{name}.txt is missing"
        );
    }
    let mut errors = Vec::new();
    let mut total = 0;
    for path in &files {
        match check_file(path) {
            Ok(n) => total += n,
            Err(e) => errors.extend(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} golden case(s) failed:\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(total >= 100, "only {total} golden cases");
}

#[test]
fn the_format_is_parsed_as_documented() {
    let text =
        b"# comment\n\npass - {}\nfail 2025-07-07T00:00:00Z  x\nreason: why\nfail-hex - 7b 7D\nreason: r\npass -\n";
    let cases = parse(text).unwrap();
    assert_eq!(cases.len(), 4);
    assert_eq!(
        (cases[0].pass, cases[0].ingest_ms, &cases[0].payload[..]),
        (true, None, &b"{}"[..])
    );
    assert_eq!(
        cases[1].payload, b" x",
        "the payload is the rest of the line after one space"
    );
    assert_eq!(cases[1].ingest_ms, parse_rfc3339("2025-07-07T00:00:00Z"));
    assert_eq!(cases[1].reason.as_deref(), Some("why"));
    assert_eq!(cases[2].payload, b"{}");
    assert_eq!(cases[3].payload, b"", "an empty payload");
    assert!(parse(b"fail - x\n").is_err(), "a fail without a reason");
    assert!(parse(b"fail - x\npass - y\n").is_err(), "a fail without a reason");
    assert!(parse(b"reason: x\n").is_err(), "a reason without a fail");
    assert!(parse(b"maybe - x\n").is_err(), "an unknown verb");
}
