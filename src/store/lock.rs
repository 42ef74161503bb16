//! One server per database. Recovery at start-up settles every hold it
//! finds, so a second server on the same database (a rolling restart done
//! in place) would charge the first one's live requests and delete its
//! journal. `serve` therefore holds an exclusive lock on a file beside the
//! database for as long as it runs; the CLI's edits do not need it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Held while the server runs; the lock goes with the descriptor (or
/// PostgreSQL's session), also when the process dies.
pub struct ServeLock {
    _file: File,
    _shared: Option<super::postgres::ServeLock>,
}

/// The file lock beside `config.path`, and with `config.url`, PostgreSQL's
/// lock for node `node` too: a second process under the same node name (or
/// a copy of this config on another machine) is refused. Blocks: not on
/// an async thread.
pub fn acquire_store(config: &crate::config::StoreConfig, node: &str) -> Result<ServeLock, Error> {
    let mut lock = acquire(&config.path)?;
    if let Some(url) = &config.url {
        let target = super::postgres::Target::parse(url, config.ca_file.as_deref())?;
        lock._shared = Some(super::postgres::ServeLock::node(target, node)?);
    }
    Ok(lock)
}

pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the lock, or says who has it; nothing else is touched either way.
pub fn acquire(db: &Path) -> Result<ServeLock, Error> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let path = lock_path(db);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    // SAFETY: a plain system call on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(Error::Usage(format!(
                "another `abhiapi serve` is running on {} (it holds {}): stop it first; \
                 the keys and accounts commands work beside it",
                db.display(),
                path.display()
            )));
        }
        return Err(e.into());
    }
    Ok(ServeLock {
        _file: file,
        _shared: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("abhiapi.db");
        let first = acquire(&db).unwrap();
        let refused = acquire(&db).err().expect("second lock refused");
        assert!(refused.to_string().contains("another `abhiapi serve`"));
        drop(first);
        acquire(&db).unwrap();
    }
}
