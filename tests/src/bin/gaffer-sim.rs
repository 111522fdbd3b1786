//! `gaffer-sim`: N simulated agents in one process against a running `gaffer-control serve`; see
//! [`gaffer_tests::sim`] for what it does and measures.
//!
//! ```text
//! gaffer-sim --data-dir CONTROL_DIR --control HOST:PORT --agents N --duration-secs S --jobs-per-sec R [--json]
//! ```
//!
//! Exit status: 0 when every agent was connected and every submitted job succeeded; 1 when not
//! (the reasons on stderr, and in `failures` with `--json`) or when the run could not start; 2 for
//! bad arguments. Logs go to stderr (`GAFFER_LOG`, default `warn,gaffer_tests=info`).

use std::process::ExitCode;

use clap::Parser as _;
use gaffer_tests::sim::{self, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,gaffer_tests=info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gaffer-sim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match rt.block_on(sim::run(&args)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gaffer-sim: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("gaffer-sim: cannot print the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", sim::table(&report));
    }
    // The endpoints' and agents' last tasks are not waited for.
    rt.shutdown_background();
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &report.failures {
            eprintln!("gaffer-sim: FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}
