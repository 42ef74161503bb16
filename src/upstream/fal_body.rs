//! fal's answer body as the proxy reads it: fal's bytes, untouched, and
//! the connection they came on, which goes back to its thread's idle list
//! once the answer has been read to its end (and is closed if it is not).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::Lease;

pub struct FalBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl FalBody {
    pub(super) fn new(body: Incoming, lease: Lease) -> Self {
        let mut this = Self {
            body,
            lease: Some(lease),
        };
        if http_body::Body::is_end_stream(&this.body) {
            this.ended();
        }
        this
    }

    fn ended(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.give_back();
        }
    }
}

impl http_body::Body for FalBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.ended(),
            Some(Ok(_)) if this.body.is_end_stream() => this.ended(),
            Some(Ok(_)) => {}
            // A connection that failed mid-answer is not reused.
            Some(Err(_)) => this.lease = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
