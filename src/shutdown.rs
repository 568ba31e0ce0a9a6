//! Stopping on a signal: Ctrl-C (SIGINT) or a supervisor's SIGTERM (systemd's `stop`) asks
//! the running command to drain — stop reading, finish the epochs in flight, write what they
//! sealed, commit — and exit 0. A second signal while draining exits at once (what is not
//! committed is redone by the next start, as after a crash).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop was asked for (by a signal, once [`on_signal`] was installed).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Resolves on the next SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Watches for SIGINT and SIGTERM on a thread of its own: the first marks [`requested`],
/// says `what` ("finishing the epochs in flight") and calls `then`; a second exits at once
/// with status 130.
pub fn on_signal(what: &'static str, then: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(signal());
        REQUESTED.store(true, Ordering::Relaxed);
        eprintln!("stopping: {what} (signal again to stop at once)");
        then();
        rt.block_on(signal());
        eprintln!("stopping at once");
        std::process::exit(130);
    });
}
