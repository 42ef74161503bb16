//! The command line: `serve`, and the operator's `keys` and `accounts`
//! commands, which edit SQLite directly and so work with or without a
//! running server.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::error::Error;
use crate::store::{self, admin};

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
    /// Show an account's balance.
    Show { name: String },
}

#[derive(Args)]
pub struct Topup {
    pub name: String,
    #[arg(long, allow_negative_numbers = true)]
    pub credits: i64,
}

/// Runs a `keys` or `accounts` command and returns what to print.
pub fn run_admin(config: &Config, command: Command) -> Result<String, Error> {
    let mut conn = store::open(&config.store.path)?;
    let out = match command {
        Command::Serve { .. } => unreachable!("serve is not an admin command"),
        Command::Keys(KeysCommand::Create {
            account,
            credits,
            plan,
        }) => {
            let k = admin::create_key(&mut conn, &account, credits, &plan)?;
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
            for k in admin::list_keys(&conn, account.as_deref())? {
                out += &format!(
                    "\n{:<6} {:<14} {:<20} {:<9} {}",
                    k.id,
                    format!("{}…", k.display_prefix),
                    k.account,
                    if k.disabled { "disabled" } else { "active" },
                    k.last_used_at.map_or("never".into(), format_time)
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
            format!(
                "account {}\nplan    {}\nstate   {}\nbalance {} credits",
                a.name,
                a.plan,
                if a.suspended { "suspended" } else { "active" },
                a.balance
            )
        }
    };
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, without a date crate.
fn format_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_time(1_795_999_999), "2026-11-30 00:53:19");
        assert_eq!(super::format_time(951_782_400), "2000-02-29 00:00:00");
    }
}
