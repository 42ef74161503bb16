//! The command line: `serve`, and the operator's `keys` and `accounts`
//! commands, which edit SQLite directly and so work with or without a
//! running server.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::billing::pricing::PriceTable;
use crate::config::Config;
use crate::dates;
use crate::error::Error;
use crate::store::{self, admin, payments};
use crate::usage;

#[derive(Parser)]
#[command(
    name = "abhiapi",
    version,
    about = "A transparent billing proxy for fal.ai"
)]
pub struct Cli {
    /// Path to config.toml (default ./config.toml, else the embedded default).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Run against a built-in mock fal on loopback, with a ready demo key.
        #[arg(long)]
        demo: bool,
    },
    /// Create, list, disable and enable API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Top up, suspend, resume and show accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// An account's card payments and their refunds.
    #[command(subcommand)]
    Payments(PaymentsCommand),
    /// The database itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// fal's prices against the table in force.
    #[command(subcommand)]
    Prices(PricesCommand),
    /// Match our charges to fal's billing records for a period: what fal
    /// billed, what we charged, and every call fal billed that we did not
    /// (exit status 2 when those cost more than --tolerance-usd).
    Reconcile(ReconcileCommand),
    /// An account's charges and totals per model.
    Usage {
        name: String,
        /// Only charges settled on or after this UTC date (YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum PricesCommand {
    /// Ask fal's pricing API for the price of every endpoint the table
    /// names, and show what differs from the table in force.
    Sync {
        /// Store the changed and new prices; running servers put them in
        /// force for the requests they admit from then on.
        #[arg(long)]
        apply: bool,
        /// Every endpoint fal's model listing gives, not only those the table names.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop synced prices, so that the table's rules price those endpoints
    /// again (every synced price if no endpoint is named).
    Forget { endpoints: Vec<String> },
}

#[derive(Args)]
pub struct ReconcileCommand {
    /// The period's start: a UTC date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM:SSZ).
    #[arg(long)]
    pub since: String,
    /// The period's end, exclusive (default now).
    #[arg(long)]
    pub until: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Unbilled fal cost, in dollars, tolerated before the exit status is 2.
    #[arg(long)]
    pub tolerance_usd: Option<String>,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Copy a single node's SQLite database, exactly, into a new PostgreSQL
    /// database (stop the server first).
    Migrate {
        /// The SQLite database.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL database: postgres://user:password@host:port/name
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key (and its account, on first use); the key is the last line printed.
    Create {
        #[arg(long)]
        account: String,
        /// Opening balance of a new account, in credits (1 credit = $0.001).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        credits: i64,
        /// Plan of a new account.
        #[arg(long, default_value = "free")]
        plan: String,
    },
    /// List keys (never the secrets).
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// Refuse a key from now on (403).
    Disable { id: i64 },
    /// Accept a disabled key again.
    Enable { id: i64 },
}

#[derive(Subcommand)]
pub enum AccountsCommand {
    /// Add credits to an account.
    Topup(Topup),
    /// Refuse every key of the account (403).
    Suspend { name: String },
    /// Lift a suspension.
    Resume { name: String },
    /// Show an account's balance, holds and available credits.
    Show { name: String },
    /// Move an account to another plan (its rate limits).
    Plan { name: String, plan: String },
}

#[derive(Subcommand)]
pub enum PaymentsCommand {
    /// List an account's payments, newest first.
    List { name: String },
}

#[derive(Args)]
pub struct Topup {
    pub name: String,
    #[arg(long, allow_negative_numbers = true)]
    pub credits: i64,
}

/// Runs a `keys` or `accounts` command and returns what to print.
pub fn run_admin(config: &Config, command: Command) -> Result<String, Error> {
    if let Command::Store(StoreCommand::Migrate { from, to }) = &command {
        let copied = store::copy::sqlite_to_postgres(from, to)?;
        let lines: Vec<String> = copied
            .iter()
            .map(|(table, rows)| format!("{table:<16} {rows:>10} rows"))
            .collect();
        return Ok(format!(
            "copied {} into PostgreSQL\n{}",
            from.display(),
            lines.join("\n")
        ));
    }
    let mut conn = store::open(&config.store)?;
    let out = match command {
        Command::Serve { .. } | Command::Store(_) | Command::Prices(_) | Command::Reconcile(_) => {
            unreachable!("not a command on the configured store")
        }
        Command::Keys(KeysCommand::Create {
            account,
            credits,
            plan,
        }) => {
            known_plan(config, &plan)?;
            let k = admin::create_key(
                &mut conn,
                &account,
                credits,
                &plan,
                admin::KeyOrigin::operator(config),
            )?;
            let mut out = String::new();
            if k.new_account {
                out += &format!(
                    "created account {} (plan {}, {} credits)\n",
                    k.account.name, k.account.plan, k.account.balance
                );
            } else if credits != 0 {
                out += &format!(
                    "account {} exists: --credits ignored (use `accounts topup`)\n",
                    k.account.name
                );
            }
            out += &format!(
                "created key {} ({}…) for account {}; it is shown only this once:\n{}",
                k.id, k.display_prefix, k.account.name, k.secret
            );
            out
        }
        Command::Keys(KeysCommand::List { account }) => {
            let mut out = format!(
                "{:<6} {:<14} {:<20} {:<9} {}",
                "ID", "PREFIX", "ACCOUNT", "STATE", "LAST USED (UTC)"
            );
            for k in admin::list_keys(&mut conn, account.as_deref())? {
                out += &format!(
                    "\n{:<6} {:<14} {:<20} {:<9} {}",
                    k.id,
                    format!("{}…", k.display_prefix),
                    k.account,
                    if k.disabled { "disabled" } else { "active" },
                    k.last_used_at.map_or("never".into(), dates::format_utc)
                );
            }
            out
        }
        Command::Keys(KeysCommand::Disable { id }) => {
            admin::set_key_disabled(&mut conn, id, true)?;
            format!("key {id} disabled")
        }
        Command::Keys(KeysCommand::Enable { id }) => {
            admin::set_key_disabled(&mut conn, id, false)?;
            format!("key {id} enabled")
        }
        Command::Accounts(AccountsCommand::Topup(Topup { name, credits })) => {
            let a = admin::topup(&mut conn, &name, credits)?;
            format!("account {name}: +{credits} credits, balance {}", a.balance)
        }
        Command::Accounts(AccountsCommand::Suspend { name }) => {
            admin::set_suspended(&mut conn, &name, true)?;
            format!("account {name} suspended")
        }
        Command::Accounts(AccountsCommand::Resume { name }) => {
            admin::set_suspended(&mut conn, &name, false)?;
            format!("account {name} resumed")
        }
        Command::Accounts(AccountsCommand::Show { name }) => {
            let a = admin::account(&mut conn, &name)?;
            let s = store::leases::standing(&mut conn, a.id)?;
            format!(
                "account   {}\nplan      {}\nstate     {}\nbalance   {} credits\nleased    {} credits (to nodes)\nheld      {} credits (by requests in flight)\navailable {} credits",
                a.name,
                a.plan,
                if a.suspended { "suspended" } else { "active" },
                s.balance,
                s.leased,
                s.held,
                s.available
            )
        }
        Command::Accounts(AccountsCommand::Plan { name, plan }) => {
            known_plan(config, &plan)?;
            admin::set_plan(&mut conn, &name, &plan)?;
            format!("account {name} is now on plan {plan}")
        }
        Command::Payments(PaymentsCommand::List { name }) => {
            let account = admin::account(&mut conn, &name)?;
            payments_table(&payments::list(&mut conn, account.id)?)
        }
        Command::Usage { name, since, json } => usage(config, &mut conn, &name, since, json)?,
    };
    Ok(out)
}

fn known_plan(config: &Config, plan: &str) -> Result<(), Error> {
    if config.plans.contains_key(plan) {
        return Ok(());
    }
    let known: Vec<&str> = config.plans.keys().map(String::as_str).collect();
    Err(Error::Usage(format!(
        "no plan named {plan:?} in the config (plans: {})",
        known.join(", ")
    )))
}

fn usage(
    config: &Config,
    conn: &mut store::sql::Conn,
    name: &str,
    since: Option<String>,
    json: bool,
) -> Result<String, Error> {
    let prices = PriceTable::new(&config.billing, &config.pricing, &[])?;
    let report = usage::report(conn, &prices, name, since)?;
    if json {
        return simd_json::to_string_pretty(&report).map_err(|e| Error::Usage(e.to_string()));
    }
    let mut out = format!(
        "account {name}{}\n{:<44} {:>9} {:>10} {:>10}",
        report
            .since
            .as_deref()
            .map(|s| format!(" since {s}"))
            .unwrap_or_default(),
        "MODEL",
        "REQUESTS",
        "CREDITS",
        "USD"
    );
    for m in &report.models {
        out += &format!(
            "\n{:<44} {:>9} {:>10} {:>10}",
            m.model,
            m.requests,
            m.credits,
            prices.cost_usd(m.credits)
        );
    }
    out += &format!(
        "\n{:<44} {:>9} {:>10} {:>10}\n\n{:<20} {:<34} {:<40} {:>8} {}",
        "TOTAL",
        report.models.iter().map(|m| m.requests).sum::<u64>(),
        report.total_credits,
        report.total_usd,
        "SETTLED (UTC)",
        "REQUEST ID",
        "MODEL",
        "CREDITS",
        "OUTCOME"
    );
    for c in &report.charges {
        out += &format!(
            "\n{:<20} {:<34} {:<40} {:>8} {}{}{}",
            dates::format_utc(c.settled_at_ms / 1000),
            c.id,
            c.model,
            c.credits,
            c.outcome,
            c.fal_status
                .map(|s| format!(" (fal {s})"))
                .unwrap_or_default(),
            match c.shortfall {
                0 => String::new(),
                n => format!(" ({n} beyond the balance)"),
            }
        );
    }
    if report.total_shortfall > 0 {
        out += &format!(
            "\n\n{} credits were charged beyond the balance: the account owes them.",
            report.total_shortfall
        );
    }
    if !report.topups.is_empty() {
        out += &format!("\n\nTOP-UPS BY CARD\n{}", payments_table(&report.topups));
    }
    Ok(out)
}

/// Payments, a line each: when, the Checkout Session, amount, credits, refunds.
fn payments_table(rows: &[payments::PaymentRow]) -> String {
    let mut out = format!(
        "{:<20} {:<40} {:>10} {:>10} {:>10} {:>10}",
        "PAID (UTC)", "CHECKOUT SESSION", "AMOUNT", "CREDITS", "REFUNDED", "TAKEN BACK"
    );
    for p in rows {
        out += &format!(
            "\n{:<20} {:<40} {:>10} {:>10} {:>10} {:>10}",
            dates::format_utc(p.created_at_ms / 1000),
            p.id,
            format!("{} {}", p.amount, p.currency),
            p.credits,
            p.refunded_amount,
            p.refunded_credits
        );
    }
    out
}
