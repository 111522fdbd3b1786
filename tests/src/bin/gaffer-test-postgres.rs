//! `gaffer-test-postgres --dir DIR`: starts one throwaway PostgreSQL cluster for a whole test run
//! ([`gaffer_tests::pg::start_cluster`]: Debian's `initdb`/`pg_ctl`, a free loopback port, trust
//! authentication, as an unprivileged user when run as root), prints its superuser URL on one
//! line of stdout, and stops it (immediate shutdown) when its stdin closes or it gets SIGTERM or
//! SIGINT. `scripts/test.sh` runs it and exports the URL as `GAFFER_TEST_POSTGRES_URL`, so every
//! test process makes its own database on one server instead of starting a cluster each.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// Starts a throwaway PostgreSQL cluster for the test suite and prints its URL.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory for the cluster's data, socket and log (created; removed by the caller).
    #[arg(long)]
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cluster = gaffer_tests::pg::start_cluster(&args.dir).context("starting the test PostgreSQL")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", cluster.admin_url())?;
        out.flush()?;
    }
    // Stop on EOF of stdin, or on a signal (a plain exit would leave the server running).
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut lines = std::io::stdin().lock();
        let mut line = String::new();
        while lines.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            line.clear();
        }
        let _ = closed_tx.send(());
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = closed_rx => {}
        }
        anyhow::Ok(())
    })?;
    cluster.stop()
}
