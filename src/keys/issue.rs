//! Keys made and revoked by a running server (the dashboard, the admin
//! API): the edit in SQLite, through the one path the CLI uses too
//! (`store::admin`), and the key map updated at once rather than at the
//! next refresh, so the answer is true when it arrives.

use super::Registry;
use crate::error::Error;
use crate::store::admin::{self, CreatedKey, KeyOrigin};
use crate::store::db::Db;
use crate::store::snapshot;

/// A new key for the existing `account`, live on return.
pub async fn create(
    db: &Db,
    registry: &Registry,
    account: String,
    plan: String,
    origin: KeyOrigin,
) -> Result<CreatedKey, Error> {
    let (created, row) = db
        .run(move |conn| {
            let created = admin::create_key(conn, &account, 0, &plan, origin)?;
            let row = snapshot::key_by_id(conn, created.id)?;
            Ok((created, row))
        })
        .await?;
    if let Some(row) = row {
        registry.key_changed(&row);
    }
    Ok(created)
}

/// Disables key `id` of `account_id` and the keys made with it
/// ([`admin::revoke_key`]), refused on return; the ids disabled.
pub async fn revoke(
    db: &Db,
    registry: &Registry,
    id: i64,
    account_id: i64,
) -> Result<Vec<i64>, Error> {
    let rows = db
        .run(move |conn| {
            let mut rows = Vec::new();
            for id in admin::revoke_key(conn, id, account_id)? {
                rows.extend(snapshot::key_by_id(conn, id)?);
            }
            Ok(rows)
        })
        .await?;
    for row in &rows {
        registry.key_changed(row);
    }
    Ok(rows.iter().map(|r| r.id).collect())
}
