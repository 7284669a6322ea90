//! The `roomhub` binary: parse the command line, load settings, start
//! telemetry, run the hub until a signal; nothing else.

use clap::{Parser, Subcommand};
use roomhub::config::Settings;
use roomhub::startup::Application;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "roomhub",
    version,
    about = "A self-hosted realtime hub: rooms, history, presence over WebSockets"
)]
struct Cli {
    /// Settings file (TOML); overrides config/default.toml, overridden by ROOMHUB_* variables.
    #[arg(long, global = true, env = "ROOMHUB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the merged settings and exit 0, or the error and exit 2.
    CheckConfig,
    /// Load-test a running hub: connect clients to rooms, publish, report
    /// deliveries per second, latency and losses (see BENCHMARKS.md).
    Load(roomhub::load::LoadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The load generator is a client: it needs no hub settings.
    if let Some(Command::Load(args)) = &cli.command {
        return roomhub::load::run(args.clone());
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("roomhub: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            print!("{}", settings.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Some(Command::Load(_)) => unreachable!("handled above"),
        None => serve(settings),
    }
}

fn serve(settings: Settings) -> ExitCode {
    roomhub::telemetry::init();
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await?;
        // A fixed line on stdout that people and test harnesses can wait for.
        println!(
            "roomhub listening on http://{} (node {})",
            app.local_addr(),
            app.node_id()
        );
        let _ = std::io::stdout().flush();
        app.run_until_stopped(roomhub::shutdown::signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("roomhub: {e:#}");
            // A data dir that cannot be opened is the operator's to fix, like
            // a bad setting: exit 2, not a crash.
            let store = e
                .chain()
                .any(|c| c.downcast_ref::<roomhub::storage::StoreError>().is_some());
            if store {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
