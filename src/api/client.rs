//! `fmsflow query`: a client of the query API, printing tables (or the JSON answers).

use std::fmt::Write as _;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::answers::*;
use super::describe;

/// What to ask.
#[derive(Clone, Debug)]
pub enum Ask {
    /// `GET /api/v1/status`
    Status,
    /// `GET /api/v1/devices/{id}/hourly`
    Device {
        /// Device id.
        id: u32,
        /// RFC 3339 start.
        from: Option<String>,
        /// RFC 3339 end.
        to: Option<String>,
    },
    /// `GET /api/v1/devices/{id}/latest`
    Latest {
        /// Device id.
        id: u32,
    },
    /// `GET /api/v1/fleet/hourly`
    Fleet {
        /// Any RFC 3339 time in the hour.
        hour: Option<String>,
        /// Sort key.
        sort: Option<String>,
        /// asc or desc.
        order: Option<String>,
        /// Rows at most.
        limit: Option<usize>,
    },
    /// `GET /api/v1/quality`
    Quality {
        /// RFC 3339 start.
        from: Option<String>,
        /// RFC 3339 end.
        to: Option<String>,
        /// One device.
        device: Option<u32>,
        /// List the N worst devices.
        by_device: Option<usize>,
    },
}

/// Errors of a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The API answered with an error.
    #[error("{status}{}: {message}", parameter.as_ref().map(|p| format!(" (parameter `{p}`)")).unwrap_or_default())]
    Api {
        status: u16,
        parameter: Option<String>,
        message: String,
    },
    /// No answer.
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
}

/// A client of one process's API.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base` (`http://host:port`).
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> Result<Self, QueryError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| QueryError::Transport {
                url: base.to_string(),
                message: e.to_string(),
            })?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// `GET path?query`, decoded; an error answer becomes [`QueryError::Api`].
    pub async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, QueryError> {
        let url = format!("{}{path}", self.base);
        let transport = |e: &dyn std::fmt::Display| QueryError::Transport {
            url: url.clone(),
            message: e.to_string(),
        };
        let mut req = self.http.get(&url).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.map_err(|e| transport(&e))?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| transport(&e))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => QueryError::Api {
                    status: e.error.status,
                    parameter: e.error.parameter,
                    message: e.error.message,
                },
                Err(_) => QueryError::Api {
                    status: status.as_u16(),
                    parameter: None,
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            });
        }
        serde_json::from_slice(&body).map_err(|e| transport(&format!("unexpected answer: {e}")))
    }

    /// Asks, and renders the answer as a table or as JSON.
    pub async fn ask(&self, ask: &Ask, json: bool) -> Result<String, QueryError> {
        fn opt(q: &mut Vec<(&'static str, String)>, name: &'static str, v: &Option<impl ToString>) {
            if let Some(v) = v {
                q.push((name, v.to_string()));
            }
        }
        fn out<T: Serialize>(json: bool, t: &T, table: impl FnOnce(&T) -> String) -> String {
            if json {
                super::to_json(t)
            } else {
                table(t)
            }
        }
        let mut q = Vec::new();
        Ok(match ask {
            Ask::Status => out(
                json,
                &self.get::<StatusAnswer>("/api/v1/status", &q).await?,
                status_table,
            ),
            Ask::Device { id, from, to } => {
                opt(&mut q, "from", from);
                opt(&mut q, "to", to);
                let a: DeviceHourly = self.get(&format!("/api/v1/devices/{id}/hourly"), &q).await?;
                out(json, &a, |a| {
                    let head = format!(
                        "device {} from {} to {}, {}\n",
                        a.device,
                        a.from,
                        a.to,
                        describe(&a.as_of)
                    );
                    head + &hours_table(&a.hours, false)
                })
            }
            Ask::Latest { id } => {
                let a: DeviceLatestAnswer = self.get(&format!("/api/v1/devices/{id}/latest"), &q).await?;
                out(json, &a, |a| {
                    let mut s = format!("device {}, {}\n", a.device, describe(&a.as_of));
                    if let Some(r) = &a.reading {
                        let _ = writeln!(s, "time     {}\nis_fail  {}", r.time, r.is_fail);
                        for (m, v) in &r.metrics {
                            let _ = writeln!(s, "{m:<8} {v}");
                        }
                    }
                    s
                })
            }
            Ask::Fleet {
                hour,
                sort,
                order,
                limit,
            } => {
                opt(&mut q, "hour", hour);
                opt(&mut q, "sort", sort);
                opt(&mut q, "order", order);
                opt(&mut q, "limit", limit);
                let a: FleetHourly = self.get("/api/v1/fleet/hourly", &q).await?;
                out(json, &a, |a| {
                    let head = format!(
                        "hour {}, {} device(s), by {} {}, {}\n",
                        a.hour,
                        a.devices.len(),
                        a.sort,
                        a.order,
                        describe(&a.as_of)
                    );
                    head + &hours_table(&a.devices, true)
                })
            }
            Ask::Quality {
                from,
                to,
                device,
                by_device,
            } => {
                opt(&mut q, "from", from);
                opt(&mut q, "to", to);
                opt(&mut q, "device", device);
                opt(&mut q, "by_device", by_device);
                let a: QualityAnswer = self.get("/api/v1/quality", &q).await?;
                out(json, &a, quality_table)
            }
        })
    }
}

fn status_table(a: &StatusAnswer) -> String {
    let mut s = format!(
        "{}; watermark {}; {} devices, {} workers\n",
        describe(&a.as_of),
        a.watermark.as_deref().unwrap_or("-"),
        a.devices,
        a.workers
    );
    let _ = writeln!(
        s,
        "{:>7} {:>7} {:>9} {:>11} {:>11} {:>9} {:>6} {:>8}",
        "process", "workers", "frontier", "received", "valid", "rejected", "sealed", "files"
    );
    for p in &a.processes {
        let _ = writeln!(
            s,
            "{:>7} {:>7} {:>9} {:>11} {:>11} {:>9} {:>6} {:>8}",
            p.process, p.workers, p.frontier, p.received, p.valid, p.rejected, p.hours_sealed, p.files_written
        );
        for l in &p.partitions {
            let _ = writeln!(
                s,
                "        partition {} at {} of {} (lag {})",
                l.partition,
                l.position,
                l.end.map_or("?".into(), |e| e.to_string()),
                l.lag.map_or("?".into(), |e| e.to_string())
            );
        }
        if let Some(e) = &p.error {
            let _ = writeln!(s, "        error: {e}");
        }
    }
    s
}

fn hours_table(rows: &[HourRow], by_device: bool) -> String {
    let mut s = String::new();
    let first = if by_device { "device" } else { "hour" };
    let _ = write!(s, "{first:<20} {:>6} {:>5}", "count", "fails");
    // In the payload's order (the answer's maps are sorted by name).
    let metrics: Vec<&str> = fmsflow_dataflows::METRICS
        .iter()
        .copied()
        .filter(|m| rows.first().is_some_and(|r| r.metrics.contains_key(*m)))
        .collect();
    for m in &metrics {
        let _ = write!(s, " {:>22}", format!("{m} min/mean/max"));
    }
    s.push('\n');
    for r in rows {
        let key = if by_device {
            r.device.to_string()
        } else {
            r.hour.clone()
        };
        let _ = write!(s, "{key:<20} {:>6} {:>5}", r.count, r.fails);
        for m in &metrics {
            let x = &r.metrics[*m];
            let _ = write!(s, " {:>22}", format!("{:.1}/{:.1}/{:.1}", x.min, x.mean, x.max));
        }
        s.push('\n');
    }
    s
}

fn quality_table(a: &QualityAnswer) -> String {
    let mut s = format!(
        "{}from {} to {}, {}\ntotal {}  valid {}  valid ratio {:.4}\n",
        a.device.map(|d| format!("device {d} ")).unwrap_or_default(),
        a.from,
        a.to,
        describe(&a.as_of),
        a.counts.total,
        a.counts.valid,
        a.counts.valid_ratio
    );
    for (r, n) in &a.counts.rules {
        let _ = writeln!(s, "  {r:<16} {n}");
    }
    if let Some(devices) = &a.devices {
        let _ = writeln!(s, "{:>7} {:>9} {:>9} {:>9}", "device", "total", "valid", "rejected");
        for d in devices {
            let _ = writeln!(
                s,
                "{:>7} {:>9} {:>9} {:>9}",
                d.device,
                d.counts.total,
                d.counts.valid,
                d.counts.total - d.counts.valid
            );
        }
    }
    s
}
