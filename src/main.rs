#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use istio_csr_rs::config::{Cli, Command};

fn main() -> ExitCode {
    // ring is the only crypto provider; installing it first keeps any other out.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => match runtime.block_on(istio_csr_rs::app::serve(*args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Request(args) => runtime.block_on(istio_csr_rs::client::request::run(args)),
        Command::Bench(args) => runtime.block_on(istio_csr_rs::client::bench::run(args)),
    }
}
