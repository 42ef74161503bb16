//! An answer too large to buffer, priced all the same: it is handed to the
//! client as it comes while its cost is read from it ([`FactScanner`]),
//! and settled once fal's answer has ended. The reading runs on a task of
//! its own, so a client that leaves does not stop it: the rest of fal's
//! answer is still read, and the work still costs what it returned.

use std::sync::Arc;
use std::time::Duration;

use crate::upstream::FalBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::body::Body;
use super::detached::Detached;
use crate::billing::facts::ResponseFacts;
use crate::billing::stream_facts::FactScanner;

/// Chunks buffered between fal and a slow client.
const RELAY_CHUNKS: usize = 4;

/// `prefix` then `rest` for the client, and `settle` with what the answer
/// says (`None` if it is not one whole JSON object, or broke off) once it
/// has ended. `idle` bounds the wait for each chunk from fal, and for the
/// client to take each one.
pub(super) fn metered(
    detached: &Arc<Detached>,
    prefix: Bytes,
    rest: FalBody,
    idle: Duration,
    settle: impl FnOnce(Option<ResponseFacts>) + Send + 'static,
) -> Body {
    let (tx, rx) = mpsc::channel(RELAY_CHUNKS);
    detached.spawn(async move {
        let facts = relay(prefix, rest, idle, Some(tx)).await;
        settle(facts);
    });
    Body::Relay(rx)
}

/// What the rest of an answer says, read to its end with nobody to hand it to.
pub(super) async fn read_through(
    prefix: Bytes,
    rest: FalBody,
    idle: Duration,
) -> Option<ResponseFacts> {
    relay(prefix, rest, idle, None).await
}

async fn relay(
    prefix: Bytes,
    mut rest: FalBody,
    idle: Duration,
    mut client: Option<mpsc::Sender<Result<Bytes, hyper::Error>>>,
) -> Option<ResponseFacts> {
    let mut scan = FactScanner::default();
    let mut next = Some(prefix);
    loop {
        if let Some(chunk) = next.take() {
            scan.feed(&chunk);
            if let Some(tx) = &client {
                // The client left, or stopped reading: go on reading for the
                // price alone (its stream ends short, as the sender goes).
                let sent = tokio::time::timeout(idle, tx.send(Ok(chunk))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    client = None;
                }
            }
        }
        match tokio::time::timeout(idle, rest.frame()).await {
            Ok(Some(Ok(frame))) => next = frame.into_data().ok(),
            Ok(None) => return scan.finish(),
            Ok(Some(Err(e))) => {
                if let Some(tx) = &client {
                    let _ = tx.send(Err(e)).await;
                }
                return None;
            }
            // Stalled: the client's stream ends short (dropping the sender),
            // and the answer is priced at its hold.
            Err(_) => return None,
        }
    }
}
