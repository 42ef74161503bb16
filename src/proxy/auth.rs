//! People's sign-in: `POST /v1/auth/email` sends a link; `GET
//! /v1/auth/link?token=…` (a plain link, so that it works from any mail
//! client) shows a button that posts the token back, which starts a session
//! in a cookie; `POST /v1/auth/signout` ends it.
//! And who calls the account API: a key, as before, or a session, whose
//! changes must come from this site (`Origin`) with its CSRF token.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::body::Body;
use super::{dashboard, small_body, static_json, Conn, Proxy};
use crate::error::ApiError;
use crate::keys::{Account, ApiKey};
use crate::signin::{self, COOKIE, LINK_ROUTE};

pub(super) const PREFIX: &str = "/v1/auth/";
/// `{"email": …}` and some room.
const MAX_BODY: usize = 1024;
/// The longest a new account's first session waits for it to reach memory.
const ACCOUNT_WAIT: Duration = Duration::from_secs(1);

/// Who calls the account API.
pub(super) struct Caller {
    pub account: Arc<Account>,
    /// The key the call was made with; none when signed in by session.
    pub key: Option<Arc<ApiKey>>,
    pub session: Option<SessionCaller>,
}

pub(super) struct SessionCaller {
    pub csrf: String,
    pub email: Option<String>,
}

impl Proxy {
    pub(super) async fn auth(
        &self,
        req: Request<Incoming>,
        conn: Conn,
    ) -> Result<Response<Body>, ApiError> {
        let route = req.uri().path()[PREFIX.len()..].to_owned();
        match (req.method().clone(), route.as_str()) {
            (Method::POST, "email") => {
                #[derive(Deserialize)]
                struct Ask {
                    email: String,
                }
                let client = self.client_ip(&req, conn);
                let Ask { email } =
                    small_body::read_json(req.into_body(), MAX_BODY, self.body_pace.timeout)
                        .await?;
                self.signin
                    .send_link(&email, client, self.clock.now_ns())
                    .await?;
                Ok(static_json(StatusCode::ACCEPTED, r#"{"sent":true}"#))
            }
            // The link in the mail shows a page whose button posts the token
            // back: a page of another site cannot sign a browser in to an
            // account of its choosing (its POST carries its own Origin), and
            // a mail scanner that fetches the link does not use it up.
            (Method::GET, "link") => {
                let token = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("token=")))
                    .unwrap_or("");
                Ok(match signin::well_formed(token) {
                    true => confirm_page(token),
                    false => redirect("/dashboard?signin=expired", None),
                })
            }
            (Method::POST, "link") => {
                let from_our_page = self.sent_by_this_site(&req, conn)?;
                let secure = self.public_base(&req, conn)?.starts_with("https://");
                let form =
                    small_body::read(req.into_body(), MAX_BODY, self.body_pace.timeout).await?;
                if !from_our_page {
                    return Err(ApiError::CsrfRejected);
                }
                let token = form_urlencoded::parse(&form)
                    .find(|(k, _)| k == "token")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                match self.signin.follow(&token).await? {
                    Some(started) => {
                        // A new account is in memory before the dashboard asks for it.
                        self.refresh.applied(started.change, ACCOUNT_WAIT).await;
                        let cookie = format!(
                            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
                            started.secret,
                            started.max_age.as_secs(),
                            if secure { "; Secure" } else { "" }
                        );
                        Ok(redirect("/dashboard", Some(cookie)))
                    }
                    None => Ok(redirect("/dashboard?signin=expired", None)),
                }
            }
            (Method::POST, "signout") => {
                let caller = self.caller(&req).await?;
                let Some(session) = &caller.session else {
                    return Err(ApiError::NotFound);
                };
                self.check_same_site(&req, conn, session)?;
                if let Some(secret) = session_cookie(req.headers()) {
                    self.signin.sign_out(secret).await?;
                }
                let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
                let mut resp = static_json(StatusCode::OK, r#"{"signed_out":true}"#);
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    resp.headers_mut().insert(header::SET_COOKIE, v);
                }
                Ok(resp)
            }
            _ => Err(ApiError::NotFound),
        }
    }

    /// A key if one is presented (as on every other route), else the
    /// session in the cookie; neither is 401 as a missing key is.
    pub(super) async fn caller(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        let presented = req.headers().contains_key(super::headers::X_API_KEY)
            || req.headers().contains_key(header::AUTHORIZATION);
        if presented {
            let key = self.authenticate(req)?;
            return Ok(Caller {
                account: Arc::clone(&key.account),
                key: Some(key),
                session: None,
            });
        }
        let secret = session_cookie(req.headers()).ok_or(ApiError::MissingKey)?;
        let row = self
            .signin
            .session(secret)
            .await?
            .ok_or(ApiError::UnknownKey)?;
        let account = self
            .registry
            .account(row.account_id)
            .ok_or(ApiError::UnknownKey)?;
        if account.is_suspended() {
            return Err(ApiError::AccountSuspended);
        }
        Ok(Caller {
            account,
            key: None,
            session: Some(SessionCaller {
                csrf: row.csrf,
                email: row.email,
            }),
        })
    }

    /// A change made by session must come from a page of this site: the
    /// browser's `Origin` is ours and the request carries the session's
    /// CSRF token (which another site's page cannot read).
    pub(super) fn check_same_site(
        &self,
        req: &Request<Incoming>,
        conn: Conn,
        session: &SessionCaller,
    ) -> Result<(), ApiError> {
        let token = req
            .headers()
            .get("x-csrf-token")
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        let token_ok: bool = token.ct_eq(session.csrf.as_bytes()).into();
        if self.sent_by_this_site(req, conn)? && token_ok {
            Ok(())
        } else {
            Err(ApiError::CsrfRejected)
        }
    }

    /// The browser says the request comes from a page of this site.
    fn sent_by_this_site(&self, req: &Request<Incoming>, conn: Conn) -> Result<bool, ApiError> {
        let ours = self.public_base(req, conn)?;
        Ok(req
            .headers()
            .get(header::ORIGIN)
            .is_some_and(|o| o.as_bytes() == ours.as_bytes()))
    }

    /// The client's address: the peer's, or behind a trusted load balancer
    /// the first `x-forwarded-for` hop.
    pub(super) fn client_ip(&self, req: &Request<Incoming>, conn: Conn) -> std::net::IpAddr {
        self.trust_forwarded
            .then(|| {
                let v = req.headers().get("x-forwarded-for")?.to_str().ok()?;
                v.split(',').next()?.trim().parse().ok()
            })
            .flatten()
            .unwrap_or(conn.peer)
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// "Sign in?", with the token in a form that posts it back here. The token
/// is 64 hex digits (checked), so it goes into the page as it is.
fn confirm_page(token: &str) -> Response<Body> {
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in to AbhiAPI</title></head>
<body>
<h1>Sign in to AbhiAPI</h1>
<form method="post" action="{LINK_ROUTE}"><input type="hidden" name="token" value="{token}">
<button id="confirm" type="submit">Sign in</button></form>
</body></html>"#
    );
    let mut resp = dashboard::html(
        html,
        "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    // Not `no-referrer`: with it, the browser sends `Origin: null` on the
    // form's post, which is then refused.
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static(to));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; abhiapi_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("abhiapi_sessionx=abc"),
        );
        assert_eq!(session_cookie(&h), None);
    }
}
