use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use abhiapi::app::{self, Bound};
use abhiapi::cli::{Cli, Command};
use abhiapi::clock::MonotonicClock;
use abhiapi::config::Config;
use abhiapi::demo::{self, Demo};
use abhiapi::error::Error;
use abhiapi::log_output::{self, Flush};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = {
        let _flush_on_drop = init_logging();
        run(cli)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("abhiapi: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines go to stderr in batches (see `log_output`); without the
/// batching thread they are written one by one.
fn init_logging() -> Option<Flush> {
    let logs = tracing_subscriber::fmt()
        .event_format(abhiapi::log_format::Line)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "abhiapi=info".into()),
        );
    match log_output::batched_stderr() {
        Ok((writer, flush)) => {
            logs.with_writer(writer).init();
            Some(flush)
        }
        Err(_) => {
            logs.with_writer(std::io::stderr).init();
            None
        }
    }
}

/// Exit status of `reconcile` when fal billed more than the tolerance that we did not charge.
const UNBILLED: u8 = 2;

fn run(cli: Cli) -> Result<ExitCode, Error> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve { demo } => serve(config, cli.config, demo).map(|()| ExitCode::SUCCESS),
        Command::Prices(command) => {
            println!("{}", abhiapi::books::command::prices(&config, command)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile(command) => {
            let (text, within) = abhiapi::books::command::reconcile(&config, command)?;
            println!("{text}");
            Ok(match within {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(UNBILLED),
            })
        }
        admin => {
            println!("{}", abhiapi::cli::run_admin(&config, admin)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(mut config: Config, path: Option<PathBuf>, demo: bool) -> Result<(), Error> {
    // The work off the request threads (the admin API, the reconciler,
    // signals, the demo's mock fal); the request threads run their own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("background")
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let demo = match demo {
            true => Some(demo::prepare(&mut config).await?),
            false => None,
        };
        let fal_key = match &demo {
            Some(_) => demo::FAL_KEY.to_owned(),
            None => config.upstream.fal_key()?,
        };
        let result = app::serve(
            config,
            path,
            &fal_key,
            Arc::new(MonotonicClock::new()),
            |bound| announce(bound, demo.as_ref()),
            app::shutdown_signal(),
        )
        .await;
        if let Some(d) = demo {
            let _ = std::fs::remove_dir_all(&d.dir);
        }
        result
    });
    // The stop kept to its grace: a blocking thread still waiting (an admin
    // call on a locked SQLite) must not hold the exit.
    runtime.shutdown_background();
    result
}

/// The listening lines are a contract: tests and scripts read the addresses from them.
fn announce(bound: &Bound, demo: Option<&Demo>) {
    if let Some(addr) = bound.admin {
        println!("listening admin http://{addr}");
    }
    if let Some(addr) = bound.plain {
        println!("listening plain http://{addr}");
    }
    if let Some(addr) = bound.tls {
        println!("listening tls https://{addr}");
    }
    if let Some(d) = demo {
        if let Some(plain) = bound.plain {
            d.listening(plain);
            println!(
                "demo: Stripe stand-in at {} (top up from the dashboard)",
                d.stripe.url()
            );
            println!(
                "demo: sign up at http://{plain}/dashboard with any email address; the sign-in link is written to this log"
            );
        }
        let base = match (bound.plain, bound.tls) {
            (Some(p), _) => format!("http://{p}"),
            (None, Some(t)) => format!("https://localhost:{} --cacert certs/dev-ca.pem", t.port()),
            (None, None) => unreachable!("config requires a listener"),
        };
        println!("demo: mock fal at {}", d.mock.url(false));
        println!(
            "demo: the operator's commands against it: {}={} abhiapi --config {} reconcile --since {}",
            demo::FAL_KEY_ENV,
            demo::FAL_KEY,
            d.config.display(),
            abhiapi::dates::format_utc(abhiapi::store::now_secs())
                .split(' ')
                .next()
                .unwrap_or_default()
        );
        println!("demo key: {}", d.key);
        println!(
            "try: curl -s {base}/fal-ai/flux/dev -H 'x-api-key: {}' -H 'content-type: application/json' -d '{{\"prompt\":\"a red fox\",\"image_size\":\"square_hd\"}}'",
            d.key
        );
    }
}
