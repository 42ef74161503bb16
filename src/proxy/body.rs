//! One body type for both directions: bytes we hold (errors, validated JSON)
//! or a stream we pass along untouched (fal's answers, clients' uploads).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::FalBody;

pub enum Body {
    Full(Option<Bytes>),
    /// A client's upload.
    Stream(Incoming),
    /// fal's answer.
    Answer(FalBody),
    /// Bytes already read from fal's answer, then the rest of it.
    Chained(Option<Bytes>, FalBody),
    /// A stream read by a task of ours (that meters it) and handed on chunk
    /// by chunk; an error in it reaches the client as the stream's error.
    Relay(tokio::sync::mpsc::Receiver<Result<Bytes, hyper::Error>>),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Body::Full(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        Body::Full(None)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(incoming) => Pin::new(incoming).poll_frame(cx),
            Body::Answer(answer) => Pin::new(answer).poll_frame(cx),
            Body::Chained(prefix, incoming) => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(incoming).poll_frame(cx),
            },
            Body::Relay(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Stream(incoming) => incoming.is_end_stream(),
            Body::Answer(answer) => answer.is_end_stream(),
            Body::Chained(prefix, incoming) => prefix.is_none() && incoming.is_end_stream(),
            Body::Relay(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(incoming) => incoming.size_hint(),
            Body::Answer(answer) => answer.size_hint(),
            Body::Chained(prefix, incoming) => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = incoming.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
            Body::Relay(_) => SizeHint::new(),
        }
    }
}
