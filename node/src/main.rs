//! The `sesame` binary: parses arguments and hands them to [`sesame_node::cli::run`].

use clap::Parser as _;

/// mimalloc rather than the system allocator: a node allocates and frees many small values
/// per request and per tuple (JSON documents, log entries, rows), and glibc's malloc spent
/// a sixth of an import's profile consolidating and unlinking free chunks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = sesame_node::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SESAME_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(sesame_node::cli::DEFAULT_LOG_FILTER)
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        sesame_node::cli::LogFormat::Text => logs.init(),
        // One JSON object per line, with the span fields (the request id) in each.
        sesame_node::cli::LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    if let sesame_node::cli::Command::RenderWorker = cli.command {
        // A render pool worker: one render thread, no async runtime.
        return sesame_projector::sandbox::worker_main();
    }
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    match runtime.block_on(sesame_node::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`| head -1`): stop quietly.
        Err(e) if e.is::<sesame_node::cli::StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write as _;
            // Standard error may be closed too; there is nobody left to tell then.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
