//! The deployment as code (issue 6): `ansible-lint` and `--syntax-check` of cluster/ansible,
//! the Terraform files parsed and checked by checkov, and the engine role applied for real to
//! this machine: three engine processes deployed by Ansible form a cluster that reads Kafka
//! into a lake, survive a redeploy (they stop together and resume from the checkpoint), and
//! account for every record once.
//!
//! The tools come from `scripts/test`, which installs them into venvs under
//! `~/.cache/fmsflow` (`FMSFLOW_ANSIBLE_VENV`, `FMSFLOW_TERRAFORM_VENV`); Kafka is the test
//! cluster it starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::kafka::{bootstrap, produce_generated, unique};
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A program of one of the test venvs: `$var` or `~/.cache/fmsflow/<default>`, `bin/<name>`.
fn tool(var: &str, default: &str, name: &str) -> PathBuf {
    let venv = std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").expect("HOME"))
            .join(".cache/fmsflow")
            .join(default)
    });
    let p = venv.join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `bash scripts/test`, which installs it ({var})",
        p.display()
    );
    p
}

fn ansible(name: &str) -> PathBuf {
    tool("FMSFLOW_ANSIBLE_VENV", "venv-ansible", name)
}

fn show(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs an Ansible command in cluster/ansible, with its venv first on PATH.
fn ansible_cmd(name: &str) -> Command {
    let bin = ansible(name);
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new(bin);
    c.current_dir(repo().join("cluster/ansible"))
        .env("PATH", path)
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0");
    c
}

#[test]
fn ansible_is_lint_clean_and_every_playbook_parses() {
    let o = ansible_cmd("ansible-lint")
        .args(["--offline", "--profile", "production", "--nocolor"])
        .output()
        .unwrap();
    assert!(o.status.success(), "ansible-lint:\n{}", show(&o));
    for playbook in ["site.yml", "deploy.yml", "replay.yml"] {
        let o = ansible_cmd("ansible-playbook")
            .args(["--syntax-check", "-i", "inventory/example.yml", playbook])
            .output()
            .unwrap();
        assert!(o.status.success(), "{playbook}:\n{}", show(&o));
    }
}

#[test]
fn terraform_parses_and_checkov_fails_nothing_unjustified() {
    let python = tool("FMSFLOW_TERRAFORM_VENV", "venv-terraform", "python");
    let o = Command::new(python)
        .arg(repo().join("tests/check_terraform.py"))
        .arg(repo().join("cluster/terraform"))
        .output()
        .unwrap();
    assert!(o.status.success(), "check_terraform.py:\n{}", show(&o));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(summary["passed"].as_u64().unwrap() > 20, "{summary}");
    eprintln!("terraform: {summary}");
}

/// Stops the deployed processes however the test ends.
struct Deployed {
    ctl: PathBuf,
    processes: usize,
}

impl Deployed {
    fn stop(&self) -> Vec<Output> {
        (0..self.processes)
            .map(|i| Command::new(&self.ctl).args(["stop", &i.to_string()]).output().unwrap())
            .collect()
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        if self.ctl.exists() {
            let _ = self.stop();
        }
    }
}

/// GET of the first process's status (the whole cluster's, fanned out).
fn status(api: &str) -> Option<Value> {
    let hostport = api.trim_start_matches("http://");
    let port: u16 = hostport.rsplit_once(':')?.1.parse().ok()?;
    common::kafka::try_http_get(port, "/api/v1/status")
        .ok()
        .and_then(|body| serde_json::from_str(&body).ok())
}

/// The PLAY RECAP's `changed=` count for localhost.
fn changed(o: &Output) -> u64 {
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines()
        .rfind(|l| l.starts_with("localhost") && l.contains("changed="))
        .and_then(|l| l.split("changed=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no PLAY RECAP for localhost:\n{out}"))
}

#[test]
fn the_engine_role_deploys_a_cluster_of_three_processes_that_reads_kafka() {
    common::python();
    let raw = unique("deploy");
    let records = produce_generated(&raw, 3, 3, "0.02");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ports = common::free_ports(6);
    let apis: Vec<String> = ports[3..].iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let lake = root.join("lake");
    let inventory = serde_json::json!({
        "all": {"children": {"engine": {"hosts": {"localhost": {
            "ansible_connection": "local",
            "ansible_become": false,
            "ansible_python_interpreter": ansible("python"),
            "engine_supervisor": "direct",
            "fmsflow_user": user,
            "fmsflow_create_user": false,
            "fmsflow_prefix": root.join("opt"),
            "fmsflow_config_dir": root.join("etc"),
            "fmsflow_data_dir": root.join("data"),
            "fmsflow_log_dir": root.join("log"),
            "fmsflow_binary_src": common::bin(),
            "fmsflow_lake_url": format!("file://{}", lake.display()),
            "fmsflow_kafka_brokers": bootstrap(),
            "fmsflow_raw_topic": raw,
            "fmsflow_hourly_topic": format!("{raw}.hourly"),
            "fmsflow_rejects_topic": format!("{raw}.rejects"),
            "fmsflow_kafka_group": format!("{raw}.group"),
            "fmsflow_devices": 20,
            "engine_workers": 2,
            "engine_api_host": "127.0.0.1",
            "engine_connect_timeout": "60s",
            "engine_instances": (0..3).map(|i| serde_json::json!({
                "process": i, "timely_port": ports[i], "api_port": ports[3 + i]
            })).collect::<Vec<_>>(),
            "engine_cluster_hosts": ports[..3].iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>(),
            "engine_api_peers": apis,
        }}}}}
    });
    // JSON is YAML.
    let inv = root.join("inventory.yml");
    std::fs::write(&inv, serde_json::to_string_pretty(&inventory).unwrap()).unwrap();
    let deployed = Deployed {
        ctl: root.join("opt/bin/fmsflowctl"),
        processes: 3,
    };
    let playbook = |name: &str| {
        let o = ansible_cmd("ansible-playbook")
            .args(["-i"])
            .arg(&inv)
            .args([name, "--tags", "engine"])
            .output()
            .unwrap();
        assert!(o.status.success(), "ansible-playbook {name}:\n{}", show(&o));
        o
    };
    let first = playbook("site.yml");
    assert!(changed(&first) > 0);

    // Every record read, by the three processes together.
    let want = records.len() as u64;
    let received = || {
        status(&apis[0]).and_then(|s| {
            let procs = s["processes"].as_array()?;
            (procs.len() == 3).then(|| procs.iter().map(|p| p["received"].as_u64().unwrap_or(0)).sum::<u64>())
        })
    };
    common::wait_for(
        "the deployed cluster to read every record",
        Duration::from_secs(180),
        || received() == Some(want),
    );
    // Applying the role again changes nothing and restarts nothing.
    let again = playbook("site.yml");
    assert_eq!(changed(&again), 0, "a second run changed something:\n{}", show(&again));

    // A redeploy: every process drains and stops, the binary is installed again, and the
    // cluster resumes from the checkpoint.
    let deploy = playbook("deploy.yml");
    assert!(changed(&deploy) > 0);
    for i in 0..3 {
        let log = std::fs::read_to_string(root.join(format!("log/engine-{i}.log"))).unwrap();
        assert!(
            log.contains("stopping:") && log.contains("resuming from the checkpoint"),
            "process {i}'s log:\n{log}"
        );
    }
    common::wait_for("the redeployed cluster to answer", Duration::from_secs(120), || {
        status(&apis[0]).is_some_and(|s| s["processes"].as_array().is_some_and(|p| p.len() == 3))
    });
    // Until it has caught up again, then stopped.
    common::wait_for("the redeployed cluster to catch up", Duration::from_secs(120), || {
        status(&apis[0]).is_some_and(|s| {
            s["processes"].as_array().is_some_and(|ps| {
                ps.iter().all(|p| {
                    p["partitions"]
                        .as_array()
                        .is_some_and(|parts| parts.iter().all(|x| x["lag"] == 0))
                })
            })
        })
    });
    for o in deployed.stop() {
        assert!(o.status.success(), "fmsflowctl stop: {}", show(&o));
    }
    let lake_url = format!("file://{}", lake.display());
    common::assert_committed(&lake_url);
    // A follow stopped by SIGTERM seals only the hours the watermark has passed (the rest is
    // re-read after the next start): those hours hold exactly what a one-process replay of
    // the same topic puts in them, nothing lost, nothing twice.
    let reference = root.join("reference");
    let mut cmd = common::kafka::replay_command(&raw, 3, "earliest", &format!("file://{}", reference.display()), 1);
    cmd.env("FMSFLOW_KAFKA__GROUP", format!("{raw}.reference"))
        .env("FMSFLOW_FLEET__DEVICES", "20")
        .env("FMSFLOW_KAFKA__HOURLY_TOPIC", format!("{raw}.reference.hourly"))
        .env("FMSFLOW_KAFKA__REJECTS_TOPIC", format!("{raw}.reference.rejects"));
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "the reference replay: {}", show(&o));
    let (got, want) = (common::read_lake(&lake), common::read_lake(&reference));
    assert_eq!(got["readings"], got["readings_distinct"], "{got}");
    let hours = got["readings_by_hour"].as_object().unwrap();
    assert!(hours.len() >= 2, "the deployed cluster sealed {hours:?}");
    for (hour, n) in hours {
        assert_eq!(
            Some(n),
            want["readings_by_hour"].get(hour),
            "hour {hour}: {got} against {want}"
        );
    }
    let sealed: Vec<&Value> = want["hourly_by_hour"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| {
            hours.contains_key(&format!(
                "{}/{:02}",
                h["dt"].as_str().unwrap(),
                h["hour"].as_u64().unwrap()
            ))
        })
        .collect();
    assert_eq!(
        got["hourly_by_hour"].as_array().unwrap().iter().collect::<Vec<_>>(),
        sealed
    );
    let summary = got;
    eprintln!(
        "deployed by Ansible, redeployed, stopped: {} records produced; sealed {summary}",
        records.len()
    );
}
