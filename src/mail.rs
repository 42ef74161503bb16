//! Mail out: a sign-in link, over SMTP (`[email] smtp_url`), or, with no
//! mail server configured (and in `serve --demo`), written to the log.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::EmailConfig;
use crate::error::{ApiError, Error};

/// The longest a mail server may take to accept a message.
const SEND_WITHIN: Duration = Duration::from_secs(30);

pub enum Mailer {
    Smtp(Box<Smtp>),
    Log,
}

pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(config: &EmailConfig) -> Result<Self, Error> {
        let Some(url) = &config.smtp_url else {
            tracing::warn!("no [email] smtp_url: sign-in links are written to the log, which must stay private");
            return Ok(Mailer::Log);
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| Error::Config(format!("[email] smtp_url: {e}")))?
            .timeout(Some(SEND_WITHIN))
            .build();
        let from = config
            .from
            .parse()
            .map_err(|e| Error::Config(format!("[email] from: {e}")))?;
        Ok(Mailer::Smtp(Box::new(Smtp { transport, from })))
    }

    /// Sends `link` to `to`; an error is the mail server's refusal or silence.
    pub async fn sign_in_link(&self, to: &str, link: &str) -> Result<(), ApiError> {
        let Smtp { transport, from } = match self {
            Mailer::Log => {
                tracing::info!(email = %to, %link, "sign-in link (no mail server configured: written here)");
                return Ok(());
            }
            Mailer::Smtp(smtp) => smtp.as_ref(),
        };
        let to: Mailbox = to
            .parse()
            .map_err(|_| ApiError::InvalidInput("`email` is not an email address".into()))?;
        let message = Message::builder()
            .from(from.clone())
            .to(to)
            .subject("Your sign-in link")
            .body(format!(
                "Sign in to AbhiAPI with this link. It works once, for the next 15 minutes:\n\n{link}\n\nIf you did not ask for it, you can ignore this message.\n"
            ))
            .map_err(|e| {
                tracing::error!(error = %e, "a sign-in message could not be made");
                ApiError::Internal
            })?;
        match tokio::time::timeout(SEND_WITHIN, transport.send(message)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the mail server refused a sign-in link");
                Err(ApiError::MailFailed)
            }
            Err(_) => {
                tracing::error!("the mail server did not take a sign-in link in time");
                Err(ApiError::MailFailed)
            }
        }
    }
}
